"""Writing a build: the local folder and the Hub push (`hub.py`), and the dataset card (`card.py`)."""
