"""Shot Studio. Importing the package does one thing: it sets the OpenMP wait policy torch's CPU threads will use
(studio.threads.early), which must happen before torch loads; nothing heavy is imported."""

from studio import threads as _threads

_threads.early()
