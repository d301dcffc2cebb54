"""`speechllm serve`: a local page (`page.html`) and JSON API over the speech model and the text
reference (`app`)."""
