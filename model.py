"""SASRec, GRU4Rec, BERT4Rec and LLM-ESR over them: one sequence encoder, one or two item views.

Tensors in, tensors out: this file never opens a file.

Backbones (ModelConfig.backbone), switches of the one SeqEncoder: sasrec (causal self-attention,
Kang & McAuley 2018), bert4rec (bidirectional, trained to fill masked items, Sun et al. 2019) and
gru4rec (one GRU layer, Hidasi et al. 2016). Methods (ModelConfig.method), over any backbone:
  base     the backbone with one trainable item table
  llminit  the same, its item table initialised by PCA of the language-model (LM) item table
  llmesr   LLM-ESR (Liu et al., NeurIPS 2024): the dual view of Sec. 3.2 (Recommender) and the
           retrieval-augmented self-distillation of Sec. 3.3 (the last section of this file)
LLM-CFSR (2025) is llmesr without self-distillation (alpha 0) and with 4 heads, over embeddings of a
contrastively tuned LM (embed.py --finetune).

Padding is item 0 and sequences are left-padded, so the last column is the most recent item.
"""
import math
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import DataError


def option(default, help, **flag):
    """A ModelConfig field that is also a train.py flag of the same name: its help and argparse extras."""
    return field(default=default, metadata={'help': help, **flag})


@dataclass
class ModelConfig:
    """The model's settings; train.py makes each field with a help text a flag (--d, --no-cross, ...).
    The defaults are the paper's model; the one departure by default is causal attention."""
    n_items: int
    method: str = option('llmesr', 'what to train: the backbone alone, LLMInit (its table from the LM), '
                         'or LLM-ESR', choices=['base', 'llminit', 'llmesr'])
    backbone: str = option('sasrec', 'sequence encoder', choices=['sasrec', 'gru4rec', 'bert4rec'])
    d: int = option(64, 'hidden size of each view (also --hidden: torchrun takes --d for one of its own)',
                    also=['--hidden'])
    max_len: int = option(200, 'most recent items kept per sequence; also the size of the position table')
    layers: int = option(2, 'transformer blocks')
    heads: int = option(1, 'self-attention heads (LLM-CFSR: 4)')
    dropout: float = option(0.5, 'dropout rate')
    cross_heads: int = option(2, 'heads of the LLM-ESR cross-attention (official: 2)')
    # LLM-ESR switches: each --no-X is one of the paper's ablations
    semantic: bool = option(True, 'LLM-ESR: the semantic view')
    collaborative: bool = option(True, 'LLM-ESR: the collaborative view')
    cross: bool = option(True, 'LLM-ESR: cross-attention between the views')
    shared_encoder: bool = option(True, 'LLM-ESR: one encoder for both views')
    pca_init: bool = option(True, 'LLM-ESR: the collaborative table starts from PCA of the LM table')
    adapter_layers: int = option(2, 'LLM-ESR adapter: 2 is d_llm -> d_llm/2 -> d, 1 is d_llm -> d',
                                 choices=[1, 2])
    attention: str = option('causal', 'causal: no position sees a later one (departure: the official code '
                            'is not causal); official: self- and cross-attention see every item, so in '
                            'training a position sees its own target', choices=['causal', 'official'])
    lm_scale: str = option('official', 'official: unit-length LM rows and their unscaled PCA, as the '
                           'official code; xavier (ablation): both rescaled to the std of a '
                           'xavier-initialised table',
                           choices=['official', 'xavier'])
    loss: str = option('bce', "bce: the official code's loss, one sampled negative per target, "
                       "-ln s(s+) - ln(1 - s(s-)); bpr: the papers' pairwise loss over the same negative, "
                       '-ln s(s+ - s-); ce (ours): softmax over all items; sampled (ours): softmax over the '
                       'target and --negatives uniform items, log-Q corrected',
                       choices=['bce', 'bpr', 'ce', 'sampled'])
    negatives: int = option(256, '--loss sampled: uniform negatives shared by a batch')


def pick_device(name):
    """'auto' -> CUDA when there is one, else the CPU; 'cpu', 'cuda' or 'cuda:N' when it exists."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device {name}: not a device; use 'auto', 'cpu' or 'cuda'") from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise DataError(f'--device {name}: this machine has no CUDA device; use --device cpu')
    if device.type not in ('cpu', 'cuda'):
        raise DataError(f"--device {name}: only 'cpu' and 'cuda' are supported")
    return device


# ---------------------------------------------------------------------------------------------
# hand-written pieces: PCA and attention


def pca(x, k):
    """(n, d_llm) -> (n, k): centre, covariance, eigendecomposition, projection on the top k axes.

    Each axis's sign is fixed so that its largest-magnitude loading is positive, which makes the
    result deterministic (eigenvectors are defined up to sign).
    """
    x = x.double()
    centred = x - x.mean(0, keepdim=True)                          # (n, d_llm)
    cov = centred.T @ centred / (len(x) - 1)                       # (d_llm, d_llm)
    _, vectors = torch.linalg.eigh(cov)                            # ascending eigenvalues
    top = vectors[:, -k:].flip(1)                                  # (d_llm, k), largest first
    top = top * torch.sign(top.gather(0, top.abs().argmax(0, keepdim=True)))
    return (centred @ top).float()


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention written out; queries from one sequence, keys/values from another."""

    def __init__(self, d, n_heads, dropout, bias=True):
        super().__init__()
        assert d % n_heads == 0
        self.n_heads = n_heads
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, d, bias=bias)
        self.v = nn.Linear(d, d, bias=bias)
        self.out = nn.Linear(d, d)
        self.dropout = Dropout(dropout)

    def forward(self, x, context, bias):
        """x (B, L, d) queries, context (B, L, d) keys and values, bias (B, 1, L, L) -> (B, L, d).

        `bias` is attention_bias(). The (L, L) scores are the large tensors here, so the scale goes on
        q and the mask is one add.
        """
        B, L, d = x.shape
        h = self.n_heads
        q = (self.q(x) / math.sqrt(d // h)).view(B, L, h, d // h).transpose(1, 2)  # (B, h, L, dh)
        k = self.k(context).view(B, L, h, d // h).transpose(1, 2)  # (B, h, L, dh)
        v = self.v(context).view(B, L, h, d // h).transpose(1, 2)  # (B, h, L, dh)
        weights = self.dropout((q @ k.transpose(-2, -1) + bias).softmax(-1))  # (B, h, L, L), rows sum to 1
        return self.out((weights @ v).transpose(1, 2).reshape(B, L, d))


def attention_bias(seq, causal=True):
    """(B, L) item ids -> (B, 1, L, L) float: 0 where query t may attend to key s, -inf elsewhere.

    Padding keys are hidden; with `causal`, so are keys after the query. Every position may attend
    to itself, so that padding queries get a defined (and later discarded) output.
    """
    L = seq.shape[1]
    allowed = (seq != 0)[:, None, None, :]                        # (B, 1, 1, L)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
    allowed = allowed | torch.eye(L, dtype=torch.bool, device=seq.device)
    return torch.zeros(allowed.shape, device=seq.device).masked_fill_(~allowed, -float('inf'))


class Dropout(nn.Module):
    """Inverted dropout from uniform draws.

    Same distribution as nn.Dropout, but torch's CPU bernoulli_ made dropout 40% of a SASRec step
    on a 2-core CPU; comparing uniform draws with p is about 3x cheaper.
    """

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, device=x.device).ge_(self.p)   # float32 draws, whatever x's dtype
        return x * keep.mul_(1 / (1 - self.p)).to(x.dtype)        # 0 or 1/(1-p)


# ---------------------------------------------------------------------------------------------
# the sequence encoder


class Block(nn.Module):
    """Pre-LayerNorm transformer block.

    Departure: the official SASRec adds the attention output to the *normalised* input
    (Q = LN(x); x = Q + attn(Q, x, x)); this is the standard pre-LN block, which trains at least as
    well and is what readers expect.
    """

    def __init__(self, d, n_heads, dropout):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = MultiHeadAttention(d, n_heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), Dropout(dropout), nn.Linear(d, d),
                                 Dropout(dropout))

    def forward(self, x, bias):
        """(B, L, d), (B, 1, L, L) attention bias -> (B, L, d)"""
        h = self.ln1(x)
        x = x + self.attn(h, h, bias)
        return x + self.ffn(self.ln2(x))


class SeqEncoder(nn.Module):
    """The sequence encoder of every backbone (cfg.backbone).

      sasrec    position embedding, causal self-attention blocks, final LayerNorm
      bert4rec  the same without the causal mask: every position sees the whole sequence
      gru4rec   one bias-free GRU layer over the item embeddings, no positions, no dropout
                (as the official GRU4Rec)

    Departure: the official LLM-ESR SASRec has no attention mask at all (its causal mask is
    commented out), so in training position t attends to item t + 1, its own target. This encoder
    is causal unless cfg.attention == 'official'; then it sees every item, but never padding keys,
    which the official code also attends to (zero inputs whose count depends on the padding).

    Positions count back from the most recent item (0 = newest). With left padding this is what
    the official absolute positions amount to at the full length, and it makes the output
    independent of how much padding a batch carries, so batches can be cut to their longest
    sequence. The GRU runs over each row's items only and its state at padding is 0, so it is
    independent of padding too.
    """

    def __init__(self, cfg):
        super().__init__()
        self.backbone = cfg.backbone
        self.causal = cfg.backbone == 'sasrec' and cfg.attention == 'causal'
        if cfg.backbone == 'gru4rec':
            self.gru = nn.GRU(cfg.d, cfg.d, num_layers=1, bias=False, batch_first=True)
            return
        self.pos = nn.Embedding(cfg.max_len, cfg.d)
        self.dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg.d, cfg.heads, cfg.dropout) for _ in range(cfg.layers))
        self.ln = nn.LayerNorm(cfg.d)

    def embed(self, x, seq):
        """Item embeddings to encoder inputs, 0 at padding: (B, L, d), (B, L) -> (B, L, d).

        The transformers scale items by sqrt(d) and add positions; the GRU takes them as they are.
        """
        keep = (seq != 0).unsqueeze(-1)                            # (B, L, 1)
        if self.backbone == 'gru4rec':
            return x * keep
        L, d = x.shape[1:]
        positions = torch.arange(L - 1, -1, -1, device=seq.device)  # (L,) newest = 0
        return self.dropout(x * math.sqrt(d) + self.pos(positions)) * keep

    def forward(self, x, seq):
        """(B, L, d) embedded sequence, (B, L) ids -> (B, L, d)"""
        if self.backbone == 'gru4rec':
            return self.gru_over_items(x, seq)
        keep = (seq != 0).unsqueeze(-1)                            # (B, L, 1)
        bias = attention_bias(seq, causal=self.causal)
        for block in self.blocks:
            x = block(x, bias) * keep
        return self.ln(x)

    def gru_over_items(self, x, seq):
        """(B, L, d), (B, L) left-padded -> (B, L, d): the GRU over each row's items, 0 at padding.

        Left padding is moved to the right and packed away. Over padding the forward would be
        harmless (zero inputs keep a bias-free GRU at 0), but the backward grows through a long
        padded prefix until float32 overflows: NaN gradients on Beauty at maximum length 200.
        """
        B, L, _ = x.shape
        n = (seq != 0).sum(1).clamp(min=1)                          # (B,) items per row
        start = (L - n)[:, None]                                    # (B, 1) first item's column
        steps = torch.arange(L, device=seq.device)[None]            # (1, L)
        items_first = x.gather(1, ((steps + start) % L)[..., None].expand_as(x))  # (B, L, d)
        rnn = nn.utils.rnn
        packed = rnn.pack_padded_sequence(items_first, n.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = rnn.pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=L)  # (B, L, d)
        return out.gather(1, ((steps - start) % L)[..., None].expand_as(out))   # back to left padding


def length_groups(lengths, keep=0.75):
    """(B,) sequence lengths -> index tensors of rows to encode together, longest first.

    The cost of encoding rows together is about rows x L x (L + 64) for their longest length L
    (attention plus position-wise layers). Split off the longest rows wherever that costs less
    than `keep` of encoding them with the rest; a batch of similar lengths stays one group.
    """
    order = lengths.argsort(descending=True)
    longest = lengths[order].double() + 1                          # + 1: the padding column kept
    cost = lambda n, L: n * L * (L + 64)                           # noqa: E731
    groups = []
    while len(order) > 1:
        k = torch.arange(1, len(order), device=lengths.device)     # split off the k longest rows
        apart = cost(k, longest[0]) + cost(len(order) - k, longest[k])
        if apart.min() > keep * cost(len(order), longest[0]):
            break
        best = int(apart.argmin()) + 1
        groups.append(order[:best])
        order, longest = order[best:], longest[best:]
    return groups + [order]


# ---------------------------------------------------------------------------------------------
# the recommender


class Recommender(nn.Module):
    """base / llminit / llmesr over one shared SeqEncoder of any backbone.

    LLM-ESR's dual view (Sec. 3.2): a semantic view (the frozen LM item table through a trainable
    adapter) and a collaborative view (a trainable table initialised by PCA of the LM table) share
    the encoder; cross-attention lets each view's sequence attend to the other's (encode()); a user
    and an item are the two views concatenated, and a score is their dot product:
        score(u, i) = [u_co ; u_sem] . [e_co(i) ; adapter(e_llm(i))]
                    = u_co . e_co(i) + u_sem . adapter(e_llm(i))

    forward(seq, pos, neg, teacher=None, alpha=0) -> (loss, parts): seq and pos are (B, L) ids, the
    input and the item each position must score (0: none); `neg` depends on cfg.loss (forward).
    BERT4Rec inputs may hold the mask token, id n_items + 1, with a trainable row in each view.
    """

    def __init__(self, cfg, llm_items=None):
        """llm_items: (n_items, d_llm) language-model item table, needed by llminit and llmesr."""
        super().__init__()
        self.cfg = cfg
        llm = cfg.method == 'llmesr'
        self.use_sem = llm and cfg.semantic
        self.use_co = not llm or cfg.collaborative
        assert self.use_sem or self.use_co, 'LLM-ESR needs at least one view'
        if cfg.method != 'base' and llm_items is None:
            raise ValueError(f'method {cfg.method} needs the language-model item table')
        if llm_items is not None and cfg.method != 'base' and cfg.d > llm_items.shape[1]:
            raise DataError(f'--d {cfg.d} is larger than the LM\'s {llm_items.shape[1]} dimensions; '
                             'use a smaller --d')
        pad = lambda t: torch.cat([t.new_zeros(1, t.shape[1]), t])  # noqa: E731  (n, k) -> (n + 1, k)
        self.mask_id = cfg.n_items + 1 if cfg.backbone == 'bert4rec' else None
        rows = cfg.n_items + 1 + (self.mask_id is not None)         # padding, items, the mask token

        std = math.sqrt(2 / (cfg.n_items + 1 + cfg.d))               # xavier-normal std of the table
        # The official tables: unit-length LM rows (ada-002 returns them so) and their PCA, unscaled.
        # The ablation cfg.lm_scale == 'xavier' rescales both to the std of SASRec's xavier-initialised
        # table, their geometry kept (unscaled MiniLM tables start ~15x larger than it).
        official = cfg.lm_scale == 'official'
        scaled = lambda t: t if official else t * (std / t.std().clamp(min=1e-12))  # noqa: E731
        if llm_items is not None:
            llm_items = torch.as_tensor(llm_items).float()
            llm_items = F.normalize(llm_items, dim=1) if official else llm_items
        if self.use_co:
            self.co_items = nn.Embedding(rows, cfg.d, padding_idx=0)
            if cfg.method == 'llminit' or (llm and cfg.pca_init):
                self.co_items.weight.data[:cfg.n_items + 1] = pad(scaled(pca(llm_items, cfg.d)))
                self.co_items.weight.data[cfg.n_items + 1:].normal_(0, std)  # the mask token, if any
            else:
                nn.init.xavier_normal_(self.co_items.weight.data[1:])
        if self.use_sem:
            self.register_buffer('llm_items', pad(scaled(llm_items)), persistent=False)
            d_llm = self.llm_items.shape[1]
            if self.mask_id is not None:
                self.llm_mask = nn.Parameter(torch.randn(d_llm) * std)  # (d_llm,) the mask token's LM vector
            # the official adapter has no nonlinearity between its two layers; neither has this one
            widths = [d_llm, d_llm // 2, cfg.d] if cfg.adapter_layers == 2 else [d_llm, cfg.d]
            self.adapter = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        two = self.use_sem and self.use_co
        if two and cfg.cross:
            # named by the stream each makes (encode()); bias-free as the official Multi_CrossAttention
            self.cross_co = MultiHeadAttention(cfg.d, cfg.cross_heads, 0.0, bias=False)
            self.cross_sem = MultiHeadAttention(cfg.d, cfg.cross_heads, 0.0, bias=False)
        self.encoder = SeqEncoder(cfg)
        self.encoder2 = SeqEncoder(cfg) if two and not cfg.shared_encoder else None
        own_init = {id(self.co_items.weight)} if self.use_co else set()   # the item table, set above
        for p in self.parameters():
            if p.dim() == 2 and id(p) not in own_init:
                nn.init.xavier_normal_(p)

    def item_table(self, ids=None):
        """(n_items + 1, D), or (len(ids), D) for 1-D `ids`: item vectors, the views concatenated.

        The full table (padding and items) is what items are ranked by; `ids` may also name the
        mask token.
        """
        n = self.cfg.n_items + 1
        tables = []
        if self.use_co:
            tables.append(self.co_items.weight[:n] if ids is None else self.co_items.weight[ids])
        if self.use_sem:
            llm = self.llm_items if self.mask_id is None else torch.cat([self.llm_items, self.llm_mask[None]])
            tables.append(self.adapt(llm[:n] if ids is None else llm[ids]))
        return torch.cat(tables, dim=1)

    def adapt(self, x):
        """(n, d_llm) LM vectors -> (n, d) through the adapter.

        Its two layers have no nonlinearity between them, so they are applied as their product, one
        (d, d_llm) matrix: the same function and gradients for a third of the multiply-adds.
        """
        if len(self.adapter) == 1:
            return self.adapter[0](x)
        first, second = self.adapter
        return F.linear(x, second.weight @ first.weight, second.weight @ first.bias + second.bias)

    def user_states(self, seq, table=None, rows=None):
        """(B, L) item ids -> (B, L, D): the user state after each position.

        `table` defaults to the full item table; `rows` (B, L) are the rows of `table` that hold
        the items of `seq` (by default `seq` itself). Rows of very different lengths are encoded in
        groups, each cut to its longest sequence plus one padding column: outputs do not depend
        on padding (see SeqEncoder) and every padding position has the same state, so the result
        is the same, but one 200-item user no longer makes 127 short ones pay for 200 positions.
        """
        table = self.item_table() if table is None else table
        rows = seq if rows is None else rows
        if seq.is_cuda:                   # the same result; grouping's sizes would wait on the GPU
            return self.encode(seq, table, rows)
        groups = length_groups((seq != 0).sum(1))
        if len(groups) == 1:
            return self.encode(seq, table, rows)
        L = seq.shape[1]
        parts = []
        for g in groups:
            cut = min(L, int((seq[g] != 0).sum(1).max()) + 1)
            states = self.encode(seq[g, -cut:], table, rows[g, -cut:])  # (b, cut, D), column 0 padding
            parts.append(torch.cat([states[:, :1].expand(-1, L - cut, -1), states], dim=1))  # (b, L, D)
        return torch.cat(parts)[torch.cat(groups).argsort()]

    def embedded_views(self, seq, table, rows):
        """(B, L) ids, (n, D) table, (B, L) rows of the table -> one (B, L, d) input sequence per view."""
        d = self.cfg.d
        return [self.encoder.embed(table[rows, i * d:(i + 1) * d], seq) for i in range(table.shape[1] // d)]

    def cross_bias(self, seq):
        """(B, L) ids -> (B, 1, L, L) the cross-attention's mask, as attention_bias()."""
        # causal for SASRec and GRU4Rec; with cfg.attention == 'official', padding keys only, as the
        # official code, so in training position t sees item t + 1, its own target
        return attention_bias(seq, causal=self.cfg.backbone != 'bert4rec' and self.cfg.attention == 'causal')

    def encode(self, seq, table, rows):
        """(B, L) ids, (n, D) table, (B, L) rows of the table -> (B, L, D), all rows at length L."""
        views = self.embedded_views(seq, table, rows)              # each (B, L, d)
        if len(views) == 2 and self.cfg.cross:
            co, sem = views
            bias = self.cross_bias(seq)
            # LLM-ESR Sec. 3.2's cross-attention. As in the official code, each view's new sequence
            # holds the *other* view's values, with no residual path: the collaborative stream is
            # semantic queries over collaborative keys and values, and the semantic stream the reverse
            views = [self.cross_co(sem, co, bias), self.cross_sem(co, sem, bias)]
        if len(views) == 2 and self.encoder2 is not None:
            return torch.cat([self.encoder(views[0], seq), self.encoder2(views[1], seq)], dim=-1)
        # both views through the one shared encoder in a single batched pass
        out = self.encoder(torch.cat(views, dim=0), seq.repeat(len(views), 1))  # (V * B, L, d)
        return torch.cat(out.chunk(len(views), dim=0), dim=-1)     # (B, L, V * d)

    def user_vectors(self, seq, table=None):
        """(B, L) -> (B, D): the state that scores the next item.

        SASRec and GRU4Rec: the state after the most recent item. BERT4Rec: the state at a mask
        token appended after it (the oldest column dropped, so the input stays within max_len).
        """
        table = self.item_table() if table is None else table      # (n_items + 1, D)
        if self.mask_id is not None:
            seq = torch.cat([seq, torch.full_like(seq[:, :1], self.mask_id)], 1)[:, -self.cfg.max_len:]
        return self.user_states(seq, self.with_mask(table))[:, -1]

    def with_mask(self, table):
        """(n_items + 1, D) ranking table -> the table inputs are looked up in (BERT4Rec: + mask token)."""
        if self.mask_id is None:
            return table
        return torch.cat([table, self.item_table(torch.tensor([self.mask_id], device=table.device))])

    def forward(self, seq, pos, neg, teacher=None, alpha=0.0):
        """(B, L) ids -> (loss, parts): the next-item loss, plus alpha * MSE to the teacher if given.

        `neg`, by cfg.loss: bce and bpr, (B, L) one negative per target (0 where pos is 0); sampled,
        (K,) negatives shared by the batch; ce, an empty tensor (every item is a negative).
        `teacher`: (B', D) each user's self-distillation target, no gradient (the last section).
        Scores and losses are float32 even under bf16 autocast.
        """
        valid = pos != 0
        loss_kind = self.cfg.loss
        if loss_kind == 'ce':
            table = self.item_table()                              # (n_items + 1, D)
            states = self.user_states(seq, self.with_mask(table))  # (B, L, D)
            with torch.autocast(seq.device.type, enabled=False):
                logits = states[valid].float() @ table[1:].float().T   # (N, I)
                rec = F.cross_entropy(logits, pos[valid] - 1)
        else:
            if seq.is_cuda:     # the whole table: torch.unique's data-dependent size would wait on the GPU
                table, seq_rows, pos_rows, neg_rows = self.with_mask(self.item_table()), seq, pos, neg
            else:               # only the items this batch touches go through the adapter: a few thousand
                ids, rows = torch.unique(torch.cat([seq.flatten(), pos.flatten(), neg.flatten()]),
                                         return_inverse=True)
                seq_rows, pos_rows, neg_rows = rows.split([seq.numel(), pos.numel(), neg.numel()])
                table = self.item_table(ids)                       # (n_unique, D)
                seq_rows, pos_rows = seq_rows.view_as(seq), pos_rows.view_as(pos)
                neg_rows = neg_rows.view_as(neg)
            states = self.user_states(seq, table, seq_rows)        # (B, L, D)
            with torch.autocast(seq.device.type, enabled=False):
                users, table = states[valid].float(), table.float()  # (N, D), (n, D)
                pos_logits = (users * table[pos_rows[valid]]).sum(-1)  # (N,)
                if loss_kind in ('bce', 'bpr'):
                    neg_logits = (users * table[neg_rows[valid]]).sum(-1)  # (N,)
                    rec = (-F.logsigmoid(pos_logits - neg_logits).mean() if loss_kind == 'bpr' else
                           F.binary_cross_entropy_with_logits(pos_logits, torch.ones_like(pos_logits)) +
                           F.binary_cross_entropy_with_logits(neg_logits, torch.zeros_like(neg_logits)))
                else:
                    # log-Q correction: a negative drawn with probability q stands for 1 / (K q) items, so
                    # its logit gets - log(K q) and the sum over the K draws estimates the sum over all
                    # items (uniform draws: q = 1 / n_items). A draw equal to the target is no negative.
                    neg_logits = users @ table[neg_rows].T - math.log(len(neg) / self.cfg.n_items)  # (N, K)
                    neg_logits = neg_logits.masked_fill(neg[None] == pos[valid][:, None], -float('inf'))
                    rec = -torch.cat([pos_logits[:, None], neg_logits], 1).log_softmax(1)[:, 0].mean()
        parts = {'rec': rec.detach()}
        loss = rec
        if teacher is not None:
            # the first B' rows are the users' (BERT4Rec: the rows whose newest item is masked)
            distill = distillation_loss(states[:len(teacher), -1].float(), teacher.float())
            parts['distill'] = distill.detach()
            loss = loss + alpha * distill
        return loss, parts


# What a run's saved config means for a key it lacks: a flag added since, whose behaviour before it
# existed was not today's default (history was kept in full ranking; LM tables were rescaled).
LEGACY = {'mask_history': False, 'lm_scale': 'xavier'}


def build_model(config, n_items, llm_items=None):
    """A Recommender from a run's flat config (train.py's flags): the keys named like ModelConfig's
    fields are the model's. llm_items (n_items, d_llm) as Recommender takes it."""
    cfg = ModelConfig(n_items, **{f.name: config.get(f.name, LEGACY.get(f.name, f.default))
                                  for f in fields(ModelConfig)[1:]})
    return Recommender(cfg, llm_items)


# ---------------------------------------------------------------------------------------------
# retrieval-augmented self-distillation (LLM-ESR Sec. 3.3), all of it: who the teachers are, the
# teacher, and the loss, L = L_rec + alpha * || u - mean_{v in N(u)} u_v ||^2 / D, N(u) the users most
# similar to u by cosine of their LM user embeddings (the MSE averages over the batch too). train.py
# keeps `user_reps`, every user's representation u_v, refreshed by each epoch's validation pass.


def similar_users(user_emb, n, chunk=None):
    """(U, d) -> (U, n) int64: the n most cosine-similar other users of each user, best first.

    On the embeddings' device, `chunk` users at a time, so memory is O(chunk x U), never O(U x U); by
    default a chunk keeps one block of similarities near 256 MiB whatever U is. A user never
    retrieves itself.
    """
    if n >= len(user_emb):
        raise ValueError(f'cannot retrieve {n} similar users among {len(user_emb)} users')
    chunk = chunk or max(1, (64 << 20) // len(user_emb))           # 64 Mi float32 = 256 MiB
    unit = F.normalize(user_emb.float(), dim=1)                    # (U, d)
    out = torch.empty(len(unit), n, dtype=torch.long, device=unit.device)
    for start in range(0, len(unit), chunk):
        sims = unit[start:start + chunk] @ unit.T                  # (c, U)
        rows = torch.arange(len(sims), device=unit.device)
        sims[rows, rows + start] = -float('inf')
        out[start:start + chunk] = sims.topk(n, dim=1).indices
    return out


def neighbour_mean(user_reps, similar):
    """(U, D) every user's representation, (B, N) similar users -> (B, D) teachers: their mean."""
    return user_reps[similar].mean(1)


def distillation_loss(student, teacher):
    """(B, D) the users' own representations, (B, D) teachers (no gradient) -> alpha's term: the MSE."""
    return F.mse_loss(student, teacher)
