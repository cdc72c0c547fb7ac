"""Inputs: the locked Debian images and their cache, zImages, kexec logs, RAM maps, DTBs, guest images."""
