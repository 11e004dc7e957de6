"""fedpriv: private federated learning on Flower and PyTorch."""
