"""alpaca-cog: LoRA instruction tuning and serving of LLaMA-family models, packaged for Cog."""
