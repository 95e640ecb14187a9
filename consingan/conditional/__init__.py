"""The class-conditional GAN family (seed 001): projection discriminator, spectral norm, self-attention, TTUR, EMA."""
