"""LoRA adapters on a shared base model: PEFT adapters checked and read (``adapter``), batched on the linear layers (``layers``), resident in slots (``manager``)."""
