# CIFAR-10 for 560 epochs: the cifar.py model and optimiser with augmentation strong enough for
# that many epochs. python train.py config/cifar_long.py --val_split 5000 --attn pure
dataset = "cifar10"
n_layer = 6
n_head = 8
n_embd = 384
init_std = 0.02
drop_path = 0.1
augment = "strong"
batch_size = 512
epochs = 560
lr = 1e-3
warmup = 0.1
eval_every = 20
eval_shift = True
compile = "reduce-overhead"
