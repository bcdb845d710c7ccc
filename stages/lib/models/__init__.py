"""Model I/O: loading SD1.5 from any source, single files, tokenizer, ControlNet, LoRA formats and exports."""
