"""A dataset and a model with planted outputs, so metrics can be computed by hand."""
import torch
from torch import nn
from torch.utils.data import Dataset

NUM_CLASSES = 7


class PlantedDataset(Dataset):
    """Item i is the 'image' tensor [i] with label i % NUM_CLASSES."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]), i % NUM_CLASSES


class PlantedModel(nn.Module):
    """Returns a fixed logits row per item index; rows have clear margins (no near-ties)."""

    def __init__(self, n: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        ranks = torch.stack([torch.randperm(NUM_CLASSES, generator=g) for _ in range(n)]).float()
        self.register_buffer("table", ranks * 2.0)  # distinct integers * 2: margins of 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0].long()]
