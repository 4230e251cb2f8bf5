"""Flows: bijections (math objects), layers, the RRDB conditioner, the SRFlow-family network and checkpoint I/O."""
