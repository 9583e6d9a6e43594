"""Optimizee problems: task families sample tasks; a task gives parameters, loss and kinds."""

from lightning_l2l.tasks.base import Task, TaskFamily
from lightning_l2l.tasks.batched import BatchedTask
from lightning_l2l.tasks.conv import ConvFamily, ConvTask
from lightning_l2l.tasks.general import GeneralFamily, GeneralTask
from lightning_l2l.tasks.mixture import MixtureFamily
from lightning_l2l.tasks.mnist import MNISTFamily, MNISTMixtureFamily, MNISTTask
from lightning_l2l.tasks.module import ModuleTask, ModuleTaskFamily
from lightning_l2l.tasks.neural_art import NeuralArtFamily, NeuralArtTask
from lightning_l2l.tasks.quadratic import QuadraticFamily, QuadraticTask

__all__ = [
    "Task",
    "TaskFamily",
    "BatchedTask",
    "QuadraticTask",
    "QuadraticFamily",
    "ModuleTask",
    "ModuleTaskFamily",
    "MNISTTask",
    "MNISTFamily",
    "MNISTMixtureFamily",
    "MixtureFamily",
    "ConvTask",
    "ConvFamily",
    "GeneralFamily",
    "GeneralTask",
    "NeuralArtFamily",
    "NeuralArtTask",
]
