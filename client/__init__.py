"""Site side of the federation: local training and evaluation on one database (Flower ClientApp)."""
