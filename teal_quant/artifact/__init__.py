"""The artifact: the on-disk format (format.py, the only code that names files and tensor keys), the model card
(card.py) and the Hub (hub.py, the only code that touches the network). Compression writes it; the runtime reads it."""
