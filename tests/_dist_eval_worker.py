"""Run under torchrun by test_evaluate.py: evaluate a planted model on one shard per rank."""
import json
import sys

import torch

from tokenslim.evaluate import evaluate, init_from_env
from planted import PlantedDataset, PlantedModel

info = init_from_env()
n = int(sys.argv[2])
result = evaluate(PlantedModel(n, seed=1), PlantedDataset(n), reference=PlantedModel(n, seed=2),
                  batch_size=4, num_workers=0, device="cpu", progress=False)
if info.rank == 0:
    with open(sys.argv[1], "w") as f:
        json.dump(result.to_dict(), f)
torch.distributed.destroy_process_group()
