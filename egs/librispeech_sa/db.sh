# Where the corpus lives on this machine or cluster: the directory holding LibriSpeech/
# (with train-clean-100, train-clean-360, dev-clean and SPEAKERS.TXT). Empty: the recipe
# synthesises an offline demo corpus in the same layout.
LIBRISPEECH=${LIBRISPEECH:-}
