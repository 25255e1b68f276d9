"""ColorFlow models (Colorization Guider, GSRP fusion net): one model per file, diffusers-style ConfigMixin."""
