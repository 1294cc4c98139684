"""Analysis of trained organisms: directions, LoRA probing, phase transitions, stability."""
