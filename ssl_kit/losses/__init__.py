"""Loss functions, usable on their own: `from ssl_kit.losses import nt_xent_loss, ...`. Pure functions (no state);
the Module wrappers add a gradient-carrying all-gather for distributed training."""
from .abc_balanced import abc_keep_probs, abc_loss, abc_unlabeled_keep_probs, bernoulli_mask
from .acr import (acr_tau, adjusted_pseudo_labels, anchor_distances, logit_adjusted_loss, logit_adjustment,
                  symmetric_kl)
from .adamatch import distribution_alignment, random_logit_interpolation, relative_threshold
from .barlow_twins import BarlowTwinsLoss, barlow_twins_loss
from .capi import capi_assignments, capi_cross_entropy, capi_loss
from .contrastive import InfoNCELoss, NTXentLoss, info_nce_loss, nt_xent_loss
from .crest import crest_sampling_rates, crest_select, progressive_alignment, progressive_temperature
from .crmatch import crmatch_feature_distance_loss
from .darp import darp_refine, darp_target, remove_noisy_entries
from .dash import dash_mask, dash_threshold, dash_weak_loss
from .debiaspl import adaptive_marginal_loss, debiased_probs, debiased_pseudo_labels, prior_update
from .dcl import DCLLoss, dcl_loss, vmf_weights
from .dinov2 import (KoLeoLoss, dinov2_cls_loss, dinov2_patch_loss, gram_loss, koleo_loss, sinkhorn_knopp_centering,
                     softmax_centering)
from .defixmatch import defixmatch_loss
from .distillation import dino_loss, dkd_loss, hint_loss, ibot_patch_loss, kd_loss, multi_teacher_kd_loss
from .ict import ict_loss, ict_mix_coefficient, ict_targets, interpolate
from .ijepa import ijepa_loss
from .emp_ssl import EMPSSLLoss, emp_ssl_loss, patch_invariance_loss, total_coding_rate
from .lejepa import LeJEPALoss, epps_pulley_grid, lejepa_loss, lejepa_prediction_loss, sigreg, sigreg_directions
from .masked import mae_loss
from .mmcr import MMCRLoss, mmcr_loss
from .msn import MSNLoss, msn_loss, msn_regularization, msn_target_probs, power_law_prior
from .nearest_neighbour import NNCLRLoss, SupportSet, nearest_neighbours, nnclr_loss
from .predictive import byol_loss, symmetric_byol_loss
from .pseudo_label import consistency_loss, fixmatch_loss
from .ramps import cosine_rampup, linear_rampup, sigmoid_rampup
from .refixmatch import kl_consistency_loss, refixmatch_low_confidence_loss
from .semi_supervised import (mean_teacher_loss, mixmatch_loss, mixmatch_targets, mixup, sharpen, tsa_mask,
                              tsa_threshold, uda_loss)
from .sequencematch import sequencematch_loss
from .simmatch import simmatch_in_loss, simmatch_unfold_aggregate
from .simmatchv2 import simmatchv2_edge_edge_loss, simmatchv2_label_propagation, simmatchv2_node_edge_loss
from .comatch import comatch_contrastive_loss, comatch_memory_smoothing, comatch_pseudo_label_graph
from .epass import ensemble_embeddings
from .remixmatch import remixmatch_distribution_alignment, remixmatch_guess, remixmatch_loss
from .supcon import SupConLoss, supcon_loss
from .swav import SwAVLoss, sinkhorn, swav_loss
from .tico import TiCoLoss, tico_loss
from .vat import entropy_minimization_loss, kl_divergence_from_logits, vat_loss, virtual_adversarial_perturbation
from .vicreg import VICRegLoss, vicreg_loss

__all__ = [
    # the design's six, and the distributed wrappers of the contrastive ones
    "nt_xent_loss", "info_nce_loss", "fixmatch_loss", "kd_loss", "mae_loss", "dino_loss", "NTXentLoss", "InfoNCELoss",
    # self-supervised methods users compare against
    "byol_loss", "symmetric_byol_loss", "barlow_twins_loss", "BarlowTwinsLoss", "vicreg_loss", "VICRegLoss",
    "sinkhorn", "swav_loss", "SwAVLoss", "supcon_loss", "SupConLoss", "nearest_neighbours", "SupportSet",
    "nnclr_loss", "NNCLRLoss", "ibot_patch_loss",
    "koleo_loss", "KoLeoLoss", "sinkhorn_knopp_centering", "softmax_centering", "dinov2_cls_loss", "dinov2_patch_loss",
    "gram_loss",
    "dcl_loss", "DCLLoss", "vmf_weights", "tico_loss", "TiCoLoss", "mmcr_loss", "MMCRLoss", "ijepa_loss",
    "capi_loss", "capi_assignments", "capi_cross_entropy",
    "msn_loss", "MSNLoss", "msn_target_probs", "msn_regularization", "power_law_prior",
    "lejepa_loss", "LeJEPALoss", "sigreg", "sigreg_directions", "epps_pulley_grid", "lejepa_prediction_loss",
    "emp_ssl_loss", "EMPSSLLoss", "total_coding_rate", "patch_invariance_loss",
    # semi-supervised terms
    "consistency_loss", "sharpen", "sigmoid_rampup", "linear_rampup", "cosine_rampup", "mean_teacher_loss",
    "uda_loss", "tsa_threshold", "tsa_mask", "mixup", "mixmatch_targets", "mixmatch_loss", "relative_threshold",
    "random_logit_interpolation", "distribution_alignment", "dash_threshold", "dash_weak_loss", "dash_mask",
    "simmatch_unfold_aggregate", "simmatch_in_loss",
    "simmatchv2_label_propagation", "simmatchv2_edge_edge_loss", "simmatchv2_node_edge_loss",
    "comatch_memory_smoothing", "comatch_pseudo_label_graph", "comatch_contrastive_loss",
    "ensemble_embeddings",
    "remixmatch_distribution_alignment", "remixmatch_guess", "remixmatch_loss",
    "defixmatch_loss", "kl_consistency_loss", "refixmatch_low_confidence_loss", "sequencematch_loss",
    "crmatch_feature_distance_loss",
    "virtual_adversarial_perturbation", "vat_loss", "entropy_minimization_loss", "kl_divergence_from_logits",
    "ict_loss", "ict_targets", "ict_mix_coefficient", "interpolate",
    # semi-supervised learning on imbalanced data
    "debiased_pseudo_labels", "debiased_probs", "prior_update", "adaptive_marginal_loss",
    "logit_adjustment", "logit_adjusted_loss", "adjusted_pseudo_labels", "symmetric_kl", "anchor_distances", "acr_tau",
    "abc_keep_probs", "abc_unlabeled_keep_probs", "bernoulli_mask", "abc_loss",
    "darp_refine", "darp_target", "remove_noisy_entries",
    "crest_sampling_rates", "crest_select", "progressive_temperature", "progressive_alignment",
    # distillation
    "dkd_loss", "multi_teacher_kd_loss", "hint_loss",
]
