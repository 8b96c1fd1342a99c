"""The tiny recovery set-up shared by test_recover_scale.py and its torchrun worker."""
import copy

import torch
from torch.utils.data import TensorDataset

import tokenslim
from conftest import images, make_model


def data(n=32):
    return TensorDataset(images(n, seed=7), torch.arange(n) % 10)


def student_and_teacher(r=8):
    teacher = make_model("vit")
    with torch.no_grad():
        teacher.head.weight.mul_(40)  # confident outputs: the reduction visibly changes them
    return tokenslim.patch(copy.deepcopy(teacher), r=r), teacher
