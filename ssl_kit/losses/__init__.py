"""Loss functions, usable on their own: `from ssl_kit.losses import nt_xent_loss, ...`. Pure functions (no state);
the Module wrappers add a gradient-carrying all-gather for distributed training."""
from .contrastive import InfoNCELoss, NTXentLoss, info_nce_loss, nt_xent_loss
from .distillation import dino_loss, kd_loss
from .masked import mae_loss
from .pseudo_label import consistency_loss, fixmatch_loss

__all__ = ["nt_xent_loss", "info_nce_loss", "fixmatch_loss", "consistency_loss", "kd_loss", "mae_loss", "dino_loss",
           "NTXentLoss", "InfoNCELoss"]
