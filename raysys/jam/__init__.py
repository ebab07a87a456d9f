"""JAM (Joint Autoencoder Modulator): model, losses and distributed helpers.

``raysys.jam.losses`` holds the loss functions; ``raysys.jam.dist`` the cross-rank gather.
"""

from raysys.jam import dist, losses
from raysys.jam.model import JAM, JAMConfig

__all__ = ["JAM", "JAMConfig", "dist", "losses"]
