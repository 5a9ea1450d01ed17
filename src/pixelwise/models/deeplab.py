"""(in progress)"""

MODELS: dict = {}
