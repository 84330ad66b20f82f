"""Constants shared by training, evaluation and serving."""

IGNORE_INDEX = -100          # label value the loss skips
IMAGE_TOKEN_INDEX = -200     # input id standing for the memory tokens of one video or image
DEFAULT_IMAGE_TOKEN = "<image>"

LOGDIR = "."
