variable "region" {
  type        = string
  default     = "us-west-2"
  description = "Region the AMI is built in."
}

variable "kubernetes_version" {
  type        = string
  default     = "1.33"
  description = "EKS minor version whose AL2023 EKS-optimized AMI is the base."
}

variable "source_ami_owners" {
  type        = list(string)
  default     = ["602401143452"]
  description = "Account publishing the EKS-optimized AMIs (Amazon EKS)."
}

variable "instance_type" {
  type        = string
  default     = "c5.metal"
  description = "Build instance. Metal, so `installer check` at the end of the bake sees real KVM."
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Optional subnet for the build instance (empty: the default VPC)."
}

variable "ami_name_prefix" {
  type    = string
  default = "noded-kata"
}

variable "kata_version" {
  type        = string
  default     = "3.27.0"
  description = "Kata Containers release baked into the image (recorded in AMI tags)."
}

variable "kata_tarball" {
  type        = string
  default     = "kata-static-3.27.0-amd64.tar.xz"
  description = "Kata static release: a file name inside artifacts_dir (uploaded), or an https:// URL the build instance downloads."
}

variable "kata_sha256" {
  type        = string
  description = "sha256 of the Kata tarball; `installer bake` refuses anything else before extracting."
}

variable "artifacts_dir" {
  type        = string
  default     = "artifacts"
  description = "Local directory with the `installer` and `noded` release binaries (and the Kata tarball unless it is a URL)."
}

variable "noded_version" {
  type        = string
  default     = "dev"
  description = "noded artifact version (recorded in AMI tags)."
}

variable "guest_assets" {
  type        = string
  default     = ""
  description = "Directory name inside artifacts_dir written by `noded guest-assets --out` on a Debian host (vmlinux, initrd.cpio, guest-assets.json): baked and pinned by sha256 for noded's own template pool. Empty: no pool on the node."
}

variable "kata_runtimes" {
  type        = list(string)
  default     = ["kata-qemu", "kata-qemu-warm", "kata-clh"]
  description = "Preset Kata handlers baked into noded.toml `containerd.runtimes` (`installer bake --runtimes`): kata-qemu, kata-qemu-warm, kata-clh, kata-fc. Each is probed on every node before its startup taint is lifted, so list only what every instance type of the NodePools runs (kata-clh needs KVM, as QEMU does; kata-fc needs a devmapper snapshotter the base AMI does not set up)."
}
