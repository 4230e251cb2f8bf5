"""detect subpackage."""
