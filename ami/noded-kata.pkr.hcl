# AL2023 EKS-optimized AMI + Kata static release + noded, baked once so a Karpenter node needs no
# download at boot. The only provisioning logic is `installer bake` (see ../docs/operator-guide.md).

locals {
  timestamp    = regex_replace(timestamp(), "[- TZ:]", "")
  ami_name     = "${var.ami_name_prefix}-${var.kubernetes_version}-kata-${var.kata_version}-${local.timestamp}"
  staging_dir  = "/tmp/noded-bake"
}

source "amazon-ebs" "al2023_eks" {
  region        = var.region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id
  ssh_username  = "ec2-user"
  ami_name      = local.ami_name

  source_ami_filter {
    filters = {
      name                = "amazon-eks-node-al2023-x86_64-standard-${var.kubernetes_version}-v*"
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = var.source_ami_owners
    most_recent = true
  }

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = 40
    volume_type           = "gp3"
    iops                  = 3000
    throughput            = 125
    delete_on_termination = true
  }

  tags = {
    Name                 = local.ami_name
    "noded.io/kata"      = var.kata_version
    "noded.io/noded"     = var.noded_version
    "noded.io/k8s"       = var.kubernetes_version
    # Space-separated: commas are outside the tag characters every AWS service accepts.
    "noded.io/runtimes"  = join(" ", var.kata_runtimes)
    "noded.io/base-ami"  = "{{ .SourceAMI }}"
  }
}

build {
  sources = ["source.amazon-ebs.al2023_eks"]

  # The file provisioner uploads as the SSH user, so this upload dir is that user's: private (0700,
  # created fresh, never an existing path), and treated as untrusted input by bake.sh, which copies
  # what it needs into a root-owned directory before running anything as root.
  provisioner "shell" {
    inline = ["rm -rf ${local.staging_dir} && mkdir -m 0700 ${local.staging_dir}"]
  }

  # installer, noded and (unless kata_tarball is a URL) the Kata release.
  provisioner "file" {
    source      = "${var.artifacts_dir}/"
    destination = "${local.staging_dir}"
  }

  provisioner "shell" {
    script          = "${path.root}/scripts/bake.sh"
    execute_command = "sudo -E bash '{{ .Path }}'"
    environment_vars = [
      "STAGING=${local.staging_dir}",
      "KATA_TARBALL=${var.kata_tarball}",
      "KATA_SHA256=${var.kata_sha256}",
      "GUEST_ASSETS=${var.guest_assets}",
      "KATA_RUNTIMES=${join(",", var.kata_runtimes)}",
    ]
  }

  post-processor "manifest" {
    output     = "packer-manifest.json"
    strip_path = true
  }
}
