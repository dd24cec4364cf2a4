# Kept alone on purpose: Packer >= 1.10 needs this block (plugins left Packer core), while the Packer
# that CI validates with (Debian's 1.6.6) rejects it. CI validates ami/ without this file and parses
# this file separately with an HCL2 parser (installer/tests/ami.rs).
packer {
  required_version = ">= 1.10.0"
  required_plugins {
    amazon = {
      version = ">= 1.3.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}
