"""A host family registered from user code, outside qfusion, as docs/hosts.md shows: VipLLaVA.

VipLLaVA is a LLaVA variant (several tower layers into its projector) that qfusion does not ship a
record for; the contract tests run it like the built-in families once :func:`register` has run.
"""

import qfusion
from qfusion.adapters import FAMILIES, HostFamily, VisionSource, host_features, text_width

VIPLLAVA = HostFamily(
    name="vipllava",
    model_types=("vipllava",),
    sources=(VisionSource("projector", text_width, host_features),),  # the host's get_image_features
    vision_tower=("model.vision_tower",),
    projector=("model.multi_modal_projector",),
    stacked=("image",),  # VipLLaVA reads mm_encoder_outputs["image"] as one tensor
)


def register() -> None:
    """Register the family once per session."""
    if VIPLLAVA.name not in FAMILIES:
        qfusion.register_family(VIPLLAVA)
