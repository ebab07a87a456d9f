variable "bucket_name" {
  description = "Name of the S3 bucket for raysys outputs (runs/) and embedding caches (cache/). Globally unique."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a valid S3 bucket name: 3-63 lowercase letters, digits, dots and hyphens."
  }
}

variable "name_prefix" {
  description = "Prefix for the IAM role, policy and instance profile names."
  type        = string
  default     = "raysys"
}

variable "ray_cluster_name" {
  description = "cluster_name of the `ray up` config (cluster/gpu.yaml). The head may only stop, start, tag and terminate instances carrying this Ray cluster tag."
  type        = string
  default     = "raysys"
}

variable "cache_prefix" {
  description = "Key prefix of the embedding caches (extract.cache_dir = s3://<bucket>/<cache_prefix>). Objects under it expire."
  type        = string
  default     = "cache/"

  validation {
    condition     = length(var.cache_prefix) > 1 && endswith(var.cache_prefix, "/")
    error_message = "cache_prefix must be a non-empty key prefix ending in '/' (an empty prefix would expire the whole bucket)."
  }
}

variable "cache_expiration_days" {
  description = "Days after which objects under cache_prefix are deleted. Caches are recomputable; run outputs are not touched."
  type        = number
  default     = 30

  validation {
    condition     = var.cache_expiration_days >= 1
    error_message = "cache_expiration_days must be at least 1."
  }
}

variable "abort_incomplete_multipart_days" {
  description = "Days after which incomplete multipart uploads (anywhere in the bucket) are aborted."
  type        = number
  default     = 7
}

variable "enable_versioning" {
  description = "Turn on S3 versioning (noncurrent versions under cache_prefix still expire)."
  type        = bool
  default     = false
}

variable "kms_key_arn" {
  description = "KMS key for bucket encryption (SSE-KMS). Empty: SSE-S3 (AES256)."
  type        = string
  default     = ""
}

variable "force_destroy" {
  description = "Allow `terraform destroy` to delete a non-empty bucket."
  type        = bool
  default     = false
}

variable "eks_oidc_provider_arn" {
  description = "ARN of an EKS cluster's IAM OIDC provider. Set it to also create an IRSA role for the raysys Kubernetes service account (infra/k8s)."
  type        = string
  default     = ""
}

variable "eks_service_account" {
  description = "namespace:name of the Kubernetes service account allowed to assume the IRSA role."
  type        = string
  default     = "raysys:raysys"
}

variable "tags" {
  description = "Tags for every resource."
  type        = map(string)
  default     = { project = "raysys" }
}
