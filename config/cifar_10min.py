# CIFAR-10 in about 10 minutes on one H200: cifar_long.py for 640 epochs on all 50,000 training
# images; the test set is seen once, at the end; a checkpoint every 40 epochs for resuming.
dataset = "cifar10"
n_layer = 6
n_head = 8
n_embd = 384
mlp_ratio = 2.0
init_std = 0.02
drop_path = 0.1
batch_size = 512
epochs = 640
lr = 1e-3
warmup = 0.1
weight_decay = 0.05
label_smoothing = 0.1
rotate = 15.0
zoom = 0.15
jitter = 0.3
erase = 0.25
mixup = 0.8
cutmix = 1.0
eval_every = 0
ckpt_every = 40
eval_shift = True
compile_mode = "reduce-overhead"
