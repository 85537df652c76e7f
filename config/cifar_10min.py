# CIFAR-10 in under 10 minutes on one H200: cifar_long.py's model for 560 epochs, with weight decay 0.1 and a
# TrivialAugment-style policy (RESULTS.md §5: what each change gave). 5,000 training images are held out for
# validation; the test set is seen once, at the end; evaluation averages each image with its mirror.
dataset = "cifar10"
n_layer = 6
n_head = 8
n_embd = 384
mlp_ratio = 2.0
init_std = 0.02
drop_path = 0.1
batch_size = 512
epochs = 560
lr = 1e-3
warmup = 0.1
weight_decay = 0.1
label_smoothing = 0.1
policy = True
rotate = 15.0
zoom = 0.15
jitter = 0.3
erase = 0.25
mixup = 0.8
cutmix = 1.0
val_split = 5000
flip_eval = True
eval_every = 20
ckpt_every = 40
eval_shift = True
compile_mode = "reduce-overhead"
