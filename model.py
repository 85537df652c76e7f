"""
A small Vision Transformer whose attention is one switch, cfg.attn: softmax | pure | linear
(infsa.py's softmax_attention, pure_infsa and linear_infsa).

    patch embedding (a Linear on flattened patches) -> [CLS] + tokens + learned positions
    -> n_layer pre-LN blocks (x + Attn(LN(x)), x + MLP(LN(x))) -> LN -> linear head on CLS
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import infsa
import relu_hop

ATTN_KINDS = ("softmax", "pure", "linear")


@dataclass
class ViTConfig:
    image_size: int = 32     # input images are image_size x image_size
    patch_size: int = 4      # square patches on a stride of patch_size: (image / patch)^2 tokens
    patch_overlap: int = 0   # pixels each patch reads beyond its own on every side
    in_chans: int = 3
    n_classes: int = 10
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128        # width; head size d_h = n_embd / n_head
    mlp_ratio: float = 2.0   # MLP hidden width = mlp_ratio * n_embd
    drop_path: float = 0.0   # stochastic depth: max per-block drop rate (linear in depth)
    attn: str = "linear"     # softmax | pure | linear
    hops: int = 3            # K, Neumann terms per layer (pure)
    gamma_init: float = 0.9  # initial discount gamma for every head (pure, linear)
    init_std: float = 0.0    # Linear weights: 0 = Xavier-uniform, > 0 = N(0, init_std^2)

    def __post_init__(self):
        if self.attn not in ATTN_KINDS:
            raise ValueError(f"attn must be one of {', '.join(ATTN_KINDS)}; got {self.attn!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size "
                             f"({self.patch_size})")
        if not 0 < self.gamma_init < 1:
            raise ValueError(f"gamma_init must lie in (0, 1); got {self.gamma_init}")
        if self.hops < 1:
            raise ValueError(f"hops must be >= 1; got {self.hops}")

    @property
    def window(self):
        return self.patch_size + 2 * self.patch_overlap  # pixels a patch reads along each side

    @property
    def n_tokens(self):
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS


def paper_4l64h(attn="linear", image_size=224):
    """The paper's InfViT 4L-64H: 4 pre-LN blocks, 64 heads, patch 16, CLS, 1000 classes; width
    1024 inferred from its 53.5M parameters (52.4M here at 224^2)."""
    return ViTConfig(image_size=image_size, patch_size=16, n_classes=1000, n_layer=4, n_head=64,
                     n_embd=1024, mlp_ratio=4.0, attn=attn)


# From this many tokens CUDA runs relu_hop.py's kernels, below it padded products: with d_h = 16
# the kernels lose at 65 tokens and win from 101 (RESULTS.md §4).
FUSED_MIN_TOKENS = 100


def pure_attention(q, k, v, gamma, hops, eps=1e-6):
    """infsa.pure_infsa as the model runs it: on CUDA from FUSED_MIN_TOKENS, relu_hop's kernels
    (O(N d) memory); else the sum with gamma A_hat = (gamma / (||S||_F + eps)) S, A_hat unformed
    (fp16 forms it: S z can pass 65,504), on N padded with zero tokens to a multiple of 8 for
    aligned bf16 kernels (exact: a zero query or key adds zeros to S)."""
    N = q.shape[-2]
    if q.is_cuda and N >= FUSED_MIN_TOKENS:
        return relu_hop.pure_infsa_fused(q, k, v, gamma, hops, eps)
    q, k, v = (F.pad(t, (0, 0, 0, -N % 8)) for t in (q, k, v))  # each (B, H, 8 * ceil(N / 8), d)
    S = infsa.relu_scores(q, k)
    norm = infsa.frobenius_norm(S) + eps  # (B, H, 1, 1)
    if S.dtype == torch.float16:
        return infsa.neumann_series((S / norm).to(S.dtype), v, gamma, hops)[..., :N, :]
    return infsa.neumann_series(S, v, gamma / norm, hops)[..., :N, :]  # gamma A_hat = gamma/norm S


class Attention(nn.Module):
    """Multi-head attention with fused qkv; cfg.attn picks the mixing rule."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.n_head = cfg, cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        if cfg.attn != "softmax":  # softmax has no discount
            logit = math.log(cfg.gamma_init / (1 - cfg.gamma_init))
            self.gamma_logit = nn.Parameter(torch.full((cfg.n_head,), logit))

    def gamma(self):
        """gamma_h = sigmoid(logit_h), one per head, in (0, 1)."""
        return torch.sigmoid(self.gamma_logit)

    def heads(self, x):
        """q, k, v, each (B, H, N, d_h), from x (B, N, C)."""
        B, N, C = x.shape
        return self.qkv(x).view(B, N, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.heads(x)  # each (B, H, N, d)
        if self.cfg.attn == "softmax":
            y = infsa.softmax_attention(q, k, v)  # (B, H, N, d)
        elif self.cfg.attn == "pure":
            y = pure_attention(q, k, v, self.gamma().view(-1, 1, 1), self.cfg.hops)  # (B, H, N, d)
        else:  # (B, H, 1, d): one context vector, which the residual add broadcasts to N tokens
            y = infsa.linear_infsa(q, k, v, self.gamma().view(-1, 1, 1), expand=False)
        y = y.transpose(1, 2).reshape(B, y.shape[2], C)  # (B, N, C); linear: (B, 1, C)
        return self.proj(y)

    @torch.no_grad()
    def maps(self, x):
        """Per-head maps of input x for pictures: softmax -> P (B,H,N,N) and its CLS row (B,H,N);
        pure -> A_hat (B,H,N,N), its Katz in-centrality (B,H,N) and gamma (H,);
        linear -> scores a (B,H,N)."""
        q, k = (t.float() for t in self.heads(x)[:2])
        if self.cfg.attn == "softmax":
            P = infsa.softmax_weights(q, k)
            return {"P": P, "cls": P[:, :, 0, :]}
        if self.cfg.attn == "pure":
            A = infsa.affinity(q, k)
            gamma = self.gamma().double().view(-1, 1, 1)  # (H, 1, 1): each head's own gamma
            katz = infsa.katz_centrality(A.double(), gamma).float()
            return {"A": A, "katz": katz, "gamma": gamma.flatten().float()}
        return {"a": infsa.linear_infsa_scores(q, k)}


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, hidden)
        self.proj = nn.Linear(hidden, cfg.n_embd)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg, drop_path=0.0):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), Attention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd), MLP(cfg)
        self.drop_path = drop_path

    def _stochastic_depth(self, y):
        """Stochastic depth: drop the whole branch for a random subset of images while training."""
        if not self.training or self.drop_path == 0.0:
            return y
        keep = torch.rand(y.shape[0], 1, 1, device=y.device) >= self.drop_path  # (B, 1, 1)
        return y * keep.to(y.dtype) / (1 - self.drop_path)

    def forward(self, x):
        x = x + self._stochastic_depth(self.attn(self.ln_1(x)))
        return x + self._stochastic_depth(self.mlp(self.ln_2(x)))


class ViT(nn.Module):
    def __init__(self, cfg, verbose=True):
        super().__init__()
        self.cfg = cfg
        self.patch = nn.Linear(cfg.in_chans * cfg.window ** 2, cfg.n_embd)
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.n_embd))
        self.pos = nn.Parameter(torch.randn(1, cfg.n_tokens, cfg.n_embd) * 0.02)
        drop_rates = [cfg.drop_path * i / max(cfg.n_layer - 1, 1) for i in range(cfg.n_layer)]
        self.blocks = nn.ModuleList([Block(cfg, rate) for rate in drop_rates])
        if cfg.attn == "pure" and relu_hop.AVAILABLE:
            relu_hop.ops()  # the GPU kernel registered before torch.compile traces the model
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.n_classes)
        # Xavier-uniform scales with width (the usual 0.02 is too small below 128); the patch
        # embedding keeps PyTorch's init.
        for m in [*self.blocks.modules(), self.head]:
            if isinstance(m, nn.Linear):
                if cfg.init_std > 0:
                    nn.init.trunc_normal_(m.weight, std=cfg.init_std)  # cut at +-2
                else:
                    nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if verbose:
            print(f"ViT ({cfg.attn}): {self.num_params() / 1e6:.2f}M parameters, "
                  f"{cfg.n_tokens} tokens")

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def optimizer(self, lr, weight_decay, fused=False):
        """AdamW, betas (0.9, 0.99), with weight decay on the weight matrices alone: not on
        biases, LayerNorms, positions, CLS or gamma."""
        groups = ([], [])
        for n, p in self.named_parameters():
            groups[p.dim() >= 2 and n not in ("cls", "pos")].append(p)
        return torch.optim.AdamW([dict(params=groups[True], weight_decay=weight_decay),
                                  dict(params=groups[False], weight_decay=0.0)],
                                 lr=lr, betas=(0.9, 0.99), fused=fused)

    def embed(self, images):
        """(B, c, H, W) -> (B, h*w, C): each p x p patch, widened by o = patch_overlap pixels on
        every side (zeros past the edge), flattened in (channel, row, column) order through one
        Linear; a convolution of kernel p + 2o, stride p, padding o."""
        B, c, H, W = images.shape
        p, o = self.cfg.patch_size, self.cfg.patch_overlap
        if o:  # (B, c (p+2o)^2, h*w) -> (B, h*w, c (p+2o)^2); o = 0 takes the cheaper reshape
            return self.patch(F.unfold(images, self.cfg.window, padding=o, stride=p).mT)
        x = images.view(B, c, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, c, p, p)
        return self.patch(x.reshape(B, (H // p) * (W // p), c * p * p))  # (B, h*w, C)

    def forward(self, images, targets=None, label_smoothing=0.0):
        x = self.embed(images)  # (B, h*w, C)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos  # (B, N, C)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x[:, 0]))  # (B, n_classes), from CLS
        loss = None
        if targets is not None:  # (B,) class indices, or (B, n_classes) probabilities (mixed)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
        return logits, loss

    @torch.no_grad()
    def attention_maps(self, images):
        """(logits, [each layer's Attention.maps]) of one forward pass. Token 0 is CLS; tokens 1..
        are the patches in row-major order."""
        maps = []
        keep = lambda attn, inputs, _: maps.append(attn.maps(inputs[0]))
        hooks = [b.attn.register_forward_hook(keep) for b in self.blocks]
        try:
            return self(images)[0], maps
        finally:
            for h in hooks:
                h.remove()

    def gammas(self):
        """Learned gamma per layer and head, (n_layer, n_head); None for softmax."""
        if self.cfg.attn == "softmax":
            return None
        return torch.stack([b.attn.gamma().detach() for b in self.blocks])

    def flops_per_image(self, training=False):
        """Matmul FLOPs of one image (2 per multiply-add), attention included:
        per layer qkv 6Nd^2, proj 2Nd^2 (2d^2 for linear: one context vector), MLP 4 r N d^2;
        attention softmax 4N^2 d, pure (2 + 2K) N^2 d, linear 6 N d (three weighted sums over N:
        qbar, the scores, the context). Training = 3x forward."""
        c = self.cfg
        N, d, L = c.n_tokens, c.n_embd, c.n_layer
        attn = {"softmax": 4 * N * N * d, "pure": (2 + 2 * c.hops) * N * N * d,
                "linear": 6 * N * d}[c.attn]
        proj = 2 * d * d * (1 if c.attn == "linear" else N)
        layer = 6 * N * d * d + proj + 4 * c.mlp_ratio * N * d * d + attn
        embed = 2 * (N - 1) * c.in_chans * c.window ** 2 * d
        fwd = embed + L * layer + 2 * d * c.n_classes
        return 3 * fwd if training else fwd
