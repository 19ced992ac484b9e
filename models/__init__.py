"""The VGG16DWSep classifier, its ImageNet initialisation and early stopping."""

from models.early_stopping import EarlyStopping
from models.vgg16dwsep import (
    DWSepConv2d,
    VGG16DWSep,
    count_parameters,
    imagenet_vgg16_state_dict,
    load_vgg16_first_convs,
    parameter_table,
    trainable_parameters,
)

__all__ = [
    "DWSepConv2d",
    "EarlyStopping",
    "VGG16DWSep",
    "count_parameters",
    "imagenet_vgg16_state_dict",
    "load_vgg16_first_convs",
    "parameter_table",
    "trainable_parameters",
]
