"""Large-minibatch ImageNet training (Goyal et al. 2017) with DeepSpeed, WebDataset and submitit."""
