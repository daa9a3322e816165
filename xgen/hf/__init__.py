"""Hugging Face interoperability: xgen checkpoints <-> `LlamaForCausalLM` directories.

    cfg, params = xgen.hf.load("path/to/hf_model")          # any LLaMA-architecture model
    xgen.hf.save("out/hf", cfg, params)                      # sharded safetensors + config
    xgen.hf.write_tokenizer("out/hf")                        # XGen's tokenizer, no custom code

The tasks `export_hf` and `import_hf` (xgen/tasks/) do the same for checkpoints on disk;
see docs/hf.md. Importing this package does not import JAX.
"""

from xgen.hf.io import DEFAULT_MAX_SHARD_BYTES, export_checkpoint, import_checkpoint, load, save
from xgen.hf.tokenizer_files import write_tokenizer

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "export_checkpoint", "import_checkpoint", "load", "save", "write_tokenizer"]
