"""Everything that reaches into third-party internals (megatron-core, torch.distributed private
APIs, SGLang). One module per concern; each names the upstream versions it was checked against
and fails loudly when upstream changed shape. Installed as `erc_megatron.patches`."""
