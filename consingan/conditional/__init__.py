"""The class-conditional GAN family (a DCGAN with the usual fixes): projection discriminator, spectral norm,
self-attention, TTUR, EMA."""
