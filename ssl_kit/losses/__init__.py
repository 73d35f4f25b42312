"""Loss functions, usable on their own: `from ssl_kit.losses import nt_xent_loss, ...`. Pure functions (no state);
the Module wrappers add a gradient-carrying all-gather for distributed training."""
from .barlow_twins import BarlowTwinsLoss, barlow_twins_loss
from .contrastive import InfoNCELoss, NTXentLoss, info_nce_loss, nt_xent_loss
from .distillation import dino_loss, ibot_patch_loss, kd_loss
from .masked import mae_loss
from .nearest_neighbour import NNCLRLoss, SupportSet, nearest_neighbours, nnclr_loss
from .predictive import byol_loss, symmetric_byol_loss
from .pseudo_label import consistency_loss, fixmatch_loss
from .supcon import SupConLoss, supcon_loss
from .swav import SwAVLoss, sinkhorn, swav_loss
from .vicreg import VICRegLoss, vicreg_loss

__all__ = ["nt_xent_loss", "info_nce_loss", "fixmatch_loss", "consistency_loss", "kd_loss", "mae_loss", "dino_loss",
           "NTXentLoss", "InfoNCELoss",
           "byol_loss", "symmetric_byol_loss", "barlow_twins_loss", "BarlowTwinsLoss", "vicreg_loss", "VICRegLoss",
           "sinkhorn", "swav_loss", "SwAVLoss", "supcon_loss", "SupConLoss", "nearest_neighbours", "SupportSet",
           "nnclr_loss", "NNCLRLoss", "ibot_patch_loss"]
