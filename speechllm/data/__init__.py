"""Data the project makes or gathers itself: the labelled synthetic speech corpus (`synth`) and
the labelled real recordings from Debian packages (`real`)."""
