"""Data the project makes itself: the labelled synthetic speech corpus (`synth`)."""
