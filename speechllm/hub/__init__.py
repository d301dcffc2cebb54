"""Where weights come from: the embedded-weights registry (`weights`: fetch, verify by sha256,
convert once), the CTranslate2 Whisper reader (`convert_ct2`) and the tiny random-init test
models (`tiny`)."""
