# CIFAR-10 on one GPU, 75 epochs: python train.py config/cifar.py --attn pure
# 6 layers, 8 heads, width 384, patch 4 (65 tokens), 7.15M parameters; light augmentation.
dataset = "cifar10"
n_layer = 6
n_head = 8
n_embd = 384
init_std = 0.02
drop_path = 0.1
augment = "light"
batch_size = 512
epochs = 75
lr = 1e-3
warmup = 0.1
eval_every = 5
eval_shift = True
compile = "reduce-overhead"
