"""fasttin: ResNet18 on Tiny-ImageNet, trained fast, with the data pipeline measured stage by stage."""
__version__ = "0.1.0"
