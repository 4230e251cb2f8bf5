"""ood subpackage."""
