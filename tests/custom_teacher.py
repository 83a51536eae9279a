"""A tiny custom-code dLLM written to disk the way LLaDA / Dream ship theirs: its own
configuration and modeling files next to the weights, `auto_map` in config.json, a
module layout unlike transformers' (`net.tok`, `net.blocks[i].mix`, `net.norm_out`,
`net.proj`), bidirectional attention, and a forward that returns only a logits tensor.

`aux_head=True` adds a second vocabulary-sized linear layer, registered after the real
head and applied to the pre-norm states: the adapter's guess picks it, the probe catches
the wrong pairing, and naming `net.proj` fixes it. `logit_scale != 1` makes its logits differ from `hidden @ proj.weight.T` (as a model
that scales or soft-caps its logits does): the adapter's load-time probe must refuse it.

`block_diffusion=True` writes the block-diffusion kind instead (SDAR / WeDLM style, run with
`--teacher-kind bd3lm`): its forward takes `input_ids [b, 2L]`, a 4-D boolean attention mask
`[b, 1, 2L, 2L]` (True = attend, used as given: the model has no mask rule of its own) and
`position_ids` (its positional embedding is read at those positions, so both halves of
`[x_t, x_0]` get positions 0..L-1), and it returns a ModelOutput with `.logits`.
"""
import json
import os

CONFIGURATION = '''
from transformers import PretrainedConfig


class TinyDLMConfig(PretrainedConfig):
    model_type = "tinydlm"

    def __init__(self, vocab=64, width=32, depth=2, heads=2, logit_scale=1.0, aux_head=False, **kwargs):
        self.vocab, self.width, self.depth, self.heads, self.logit_scale = vocab, width, depth, heads, logit_scale
        self.aux_head = aux_head
        super().__init__(**kwargs)
'''

MODELING = '''
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .configuration_tinydlm import TinyDLMConfig


class Mixer(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.ff = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, x, keep):
        b, l, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)   # bidirectional
        x = x + self.out(y.transpose(1, 2).reshape(b, l, d))
        return x + self.ff(x)


class TinyDLM(PreTrainedModel):
    config_class = TinyDLMConfig

    def __init__(self, config):
        super().__init__(config)
        self.net = nn.ModuleDict(dict(
            tok=nn.Embedding(config.vocab, config.width), pos=nn.Embedding(512, config.width),
            blocks=nn.ModuleList([Mixer(config.width, config.heads) for _ in range(config.depth)]),
            norm_out=nn.LayerNorm(config.width), proj=nn.Linear(config.width, config.vocab, bias=False)))
        if config.aux_head:  # a second vocabulary-sized projection, on the pre-norm states (an auxiliary output)
            self.net["aux_head"] = nn.Linear(config.width, config.vocab, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.2)

    def get_input_embeddings(self):
        return self.net.tok

    def forward(self, input_ids, attention_mask=None):
        x = self.net.tok(input_ids) + self.net.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        for block in self.net.blocks:
            x = block(x, keep)
        if self.config.aux_head:
            self.aux_logits = self.net.aux_head(x)
        return self.net.proj(self.net.norm_out(x)) * self.config.logit_scale
'''

# the block-diffusion kind: the same blocks; a forward with a 4-D mask and position_ids; a ModelOutput
_FORWARD_HEAD = '''    def forward(self, input_ids, attention_mask=None):
        x = self.net.tok(input_ids) + self.net.pos(torch.arange(input_ids.shape[1], device=input_ids.device))
        keep = None if attention_mask is None else attention_mask.bool()[:, None, None, :]'''
_BLOCK_FORWARD_HEAD = '''    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        x = self.net.tok(input_ids) + self.net.pos(position_ids)
        if attention_mask is None or attention_mask.dim() == 4:   # [b, 1, q, k], True = attend
            keep = attention_mask
        else:                                                    # [b, k] padding
            keep = attention_mask.bool()[:, None, None, :]'''
_RETURN = "        return self.net.proj(self.net.norm_out(x)) * self.config.logit_scale"
_IMPORT = "from transformers import PreTrainedModel"
assert all(part in MODELING for part in (_FORWARD_HEAD, _RETURN, _IMPORT))
MODELING_BLOCK = (MODELING.replace(_FORWARD_HEAD, _BLOCK_FORWARD_HEAD)
                  .replace(_RETURN, "        return CausalLMOutput(logits=self.net.proj(self.net.norm_out(x)) "
                                    "* self.config.logit_scale)")
                  .replace(_IMPORT, _IMPORT + "\nfrom transformers.modeling_outputs import CausalLMOutput"))


def write_custom_teacher(path, tokenizer=None, *, vocab=64, width=32, logit_scale=1.0, aux_head=False,
                         mask_token_id=None, block_diffusion=False, block_size=None, seed=0):
    """Write the two code files, then build the model through them and save weights + config."""
    import importlib.util
    import sys

    import torch

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "configuration_tinydlm.py"), "w") as fh:
        fh.write(CONFIGURATION)
    with open(os.path.join(path, "modeling_tinydlm.py"), "w") as fh:
        fh.write(MODELING_BLOCK if block_diffusion else MODELING)
    # import the files as a throwaway package, only to make and save the weights
    package = f"tinydlm_build_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(package, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[package] = module
    config_mod = _load(package, path, "configuration_tinydlm")
    model_mod = _load(package, path, "modeling_tinydlm")
    config = config_mod.TinyDLMConfig(vocab=vocab, width=width, logit_scale=logit_scale, aux_head=aux_head)
    if mask_token_id is not None:
        config.mask_token_id = mask_token_id
    if block_size is not None:  # the block size in config.json, as block-diffusion checkpoints ship it
        config.block_size = block_size
    torch.manual_seed(seed)
    model = model_mod.TinyDLM(config)
    model.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as fh:
        saved = json.load(fh)
    saved["auto_map"] = {"AutoConfig": "configuration_tinydlm.TinyDLMConfig", "AutoModel": "modeling_tinydlm.TinyDLM"}
    saved.pop("architectures", None)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(saved, fh, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _load(package, path, name):
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(f"{package}.{name}", os.path.join(path, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"{package}.{name}"] = module
    spec.loader.exec_module(module)
    return module
