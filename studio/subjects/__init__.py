"""Tuned subjects: masks cut from a subject's photos (`masks`) and the on-disk subject library (`library`)."""
