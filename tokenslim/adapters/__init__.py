"""One adapter module per framework: each wires the shared ops (:mod:`tokenslim.ops`), methods
(:mod:`tokenslim.methods`) and the reduction step (:mod:`tokenslim.reduction`) into that framework's
modules. :mod:`tokenslim.patching` picks the adapter from the model's package.

* :mod:`~tokenslim.adapters.timm_vit`: timm ``VisionTransformer`` (and DeiT, DINOv2, CLIP-style ViTs);
* :mod:`~tokenslim.adapters.timm_channels`: channel importance, masks and materialisation on timm blocks;
* :mod:`~tokenslim.adapters.hf_vit`: Hugging Face ``transformers`` ViT / DeiT / DINOv2 / CLIP vision;
* :mod:`~tokenslim.adapters.open_clip_vit`: ``open_clip`` vision towers.

The optional frameworks are imported only when a model of theirs is passed.
"""
