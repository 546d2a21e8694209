"""Training-free controls of a render, each a small module with no UI imports, applied through diffusers' hooks."""
