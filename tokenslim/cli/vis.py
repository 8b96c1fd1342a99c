"""``tokenslim vis``: pictures of the patches each merged token holds."""
from __future__ import annotations

import argparse
import copy
import os

from . import flags


def add_vis_args(p: argparse.ArgumentParser) -> None:
    flags.add(p, "model", "pretrained", "checkpoint", "random_weights", "data")
    flags.add(p, "settings", "limit", "seed", "threads", "out", "quiet",
              settings={"default": ["r=4", "r=8"], "help": "one column per setting"},
              limit={"default": 4, "help": "one row per image"},
              out={"default": "results/vis", "help": "vis.png (a name ending in .png is the file itself)"})
    flags.alias(p, "--images", "--limit", type=int)


def run_vis_cmd(args: argparse.Namespace) -> None:
    import torch

    from ..patching import trace_merges
    from ..evaluate import open_dataset, resolve_transform, subset
    from ..spec import apply_setting, format_setting
    from ..vis import merge_picture, patch_tokens, save_grid, token_counts, unnormalize

    if args.out.lower().endswith(".png"):
        path = args.out
        flags.check_output_file(path, "--out")
    else:
        flags.check_out_dir(args.out)
        path = os.path.join(args.out, "vis.png")
    model, _, settings, _ = flags.load_model_and_settings(args)
    transform, config = resolve_transform(model)
    data = subset(open_dataset(args.data, transform), args.limit, args.seed)
    x = torch.stack([data[i][0] for i in range(len(data))])
    raw = unnormalize(x, config["mean"], config["std"])
    grid, patch = tuple(model.patch_embed.grid_size), tuple(model.patch_embed.patch_size)
    columns = [[img for img in raw]]
    titles = ["image"]
    for setting in settings:
        patched = apply_setting(copy.deepcopy(model), setting)
        if not hasattr(patched, "tokenslim"):
            raise ValueError(f"setting {format_setting(setting)!r} reduces no tokens: nothing to show")
        trace = trace_merges(patched, x)
        tokens = patch_tokens(trace.source, model.num_prefix_tokens, grid)
        columns.append([merge_picture(img, t, patch) for img, t in zip(raw, tokens)])
        counts = token_counts(tokens)
        titles.append(f"{format_setting(setting)}\n{min(counts)}-{max(counts)} tokens")
    save_grid([list(row) for row in zip(*columns)], titles, path)
    print(f"wrote {path}: {len(data)} images x {len(titles)} columns")
