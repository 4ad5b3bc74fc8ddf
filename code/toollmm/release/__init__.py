"""Release a stage folder to the Hugging Face Hub.

folder.py  the release folder (a loadable stage folder + config.json + card), how it names the base
           models, and the checks every release passes
card.py    the model card (README.md); evaluation tables come from the caller
upload.py  create the Hub repo and make its files the folder's
"""
