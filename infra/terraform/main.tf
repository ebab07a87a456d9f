# Object store for raysys: one private, encrypted bucket (run outputs under runs/, embedding
# caches under var.cache_prefix, which expire), and the IAM identities that may use it:
# EC2 instance profiles for `ray up` clusters (workers: this bucket only; head: this bucket plus
# what Ray's autoscaler needs) and, optionally, an IRSA role for KubeRay pods (this bucket only).

locals {
  bucket_arn  = aws_s3_bucket.this.arn
  objects_arn = "${aws_s3_bucket.this.arn}/*"
}

data "aws_partition" "current" {}

# --- bucket -----------------------------------------------------------------------------------

resource "aws_s3_bucket" "this" {
  bucket        = var.bucket_name
  force_destroy = var.force_destroy
  tags          = var.tags
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket                  = aws_s3_bucket.this.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.kms_key_arn == "" ? "AES256" : "aws:kms"
      kms_master_key_id = var.kms_key_arn == "" ? null : var.kms_key_arn
    }
    bucket_key_enabled = var.kms_key_arn != ""
  }
}

resource "aws_s3_bucket_versioning" "this" {
  count  = var.enable_versioning ? 1 : 0
  bucket = aws_s3_bucket.this.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  # Embedding caches are recomputable from the corpus: expire them.
  rule {
    id     = "expire-cache"
    status = "Enabled"
    filter {
      prefix = var.cache_prefix
    }
    expiration {
      days = var.cache_expiration_days
    }
    noncurrent_version_expiration {
      noncurrent_days = var.cache_expiration_days
    }
  }

  # Interrupted uploads (a killed extraction, a preempted node) leave billed parts behind.
  rule {
    id     = "abort-incomplete-multipart-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = var.abort_incomplete_multipart_days
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

# Refuse plain-HTTP access to the bucket.
data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [local.bucket_arn, local.objects_arn]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket     = aws_s3_bucket.this.id
  policy     = data.aws_iam_policy_document.bucket.json
  depends_on = [aws_s3_bucket_public_access_block.this]
}

# --- least-privilege access to this bucket ----------------------------------------------------

data "aws_iam_policy_document" "bucket_access" {
  statement {
    sid       = "ListBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:ListBucketMultipartUploads"]
    resources = [local.bucket_arn]
  }

  statement {
    sid = "ReadWriteObjects"
    actions = [
      "s3:GetObject",
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = [local.objects_arn]
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == "" ? [] : [var.kms_key_arn]
    content {
      sid       = "UseBucketKey"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_policy" "bucket_access" {
  name        = "${var.name_prefix}-bucket-access"
  description = "Read/write access to s3://${var.bucket_name} only"
  policy      = data.aws_iam_policy_document.bucket_access.json
  tags        = var.tags
}

# --- EC2 instance profile for `ray up` worker nodes --------------------------------------------------

data "aws_iam_policy_document" "ec2_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.${data.aws_partition.current.dns_suffix}"]
    }
  }
}

resource "aws_iam_role" "node" {
  name               = "${var.name_prefix}-node"
  description        = "raysys Ray nodes on EC2: read/write on s3://${var.bucket_name}"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "node_bucket_access" {
  role       = aws_iam_role.node.name
  policy_arn = aws_iam_policy.bucket_access.arn
}

resource "aws_iam_instance_profile" "node" {
  name = "${var.name_prefix}-node"
  role = aws_iam_role.node.name
  tags = var.tags
}

# --- EC2 instance profile for the `ray up` head node ------------------------------------------
# The head runs Ray's autoscaler, which launches, tags and terminates the worker instances and
# hands them the node instance profile. It gets the bucket policy plus exactly that: EC2
# Describe* calls (which take no resource ARNs), RunInstances, changes only to instances tagged
# with this Ray cluster's name, and PassRole for the node role only.

data "aws_iam_policy_document" "autoscaler" {
  statement {
    sid = "Describe"
    actions = [
      "ec2:DescribeInstances",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeImages",
      "ec2:DescribeSubnets",
      "ec2:DescribeSecurityGroups",
      "ec2:DescribeKeyPairs",
    ]
    resources = ["*"]
  }

  statement {
    sid       = "LaunchWorkers"
    actions   = ["ec2:RunInstances"]
    resources = ["*"]
  }

  statement {
    sid       = "TagAtLaunch"
    actions   = ["ec2:CreateTags"]
    resources = ["*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  statement {
    sid       = "ManageOwnInstances"
    actions   = ["ec2:CreateTags", "ec2:TerminateInstances", "ec2:StartInstances", "ec2:StopInstances"]
    resources = ["arn:${data.aws_partition.current.partition}:ec2:*:*:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/ray-cluster-name"
      values   = [var.ray_cluster_name]
    }
  }

  statement {
    sid       = "PassNodeRole"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.node.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.${data.aws_partition.current.dns_suffix}"]
    }
  }
}

resource "aws_iam_policy" "autoscaler" {
  name        = "${var.name_prefix}-autoscaler"
  description = "Ray autoscaler on the head of Ray cluster ${var.ray_cluster_name}: launch and stop its workers"
  policy      = data.aws_iam_policy_document.autoscaler.json
  tags        = var.tags
}

resource "aws_iam_role" "head" {
  name               = "${var.name_prefix}-head"
  description        = "raysys Ray head node on EC2: the autoscaler, and read/write on s3://${var.bucket_name}"
  assume_role_policy = data.aws_iam_policy_document.ec2_assume.json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "head_bucket_access" {
  role       = aws_iam_role.head.name
  policy_arn = aws_iam_policy.bucket_access.arn
}

resource "aws_iam_role_policy_attachment" "head_autoscaler" {
  role       = aws_iam_role.head.name
  policy_arn = aws_iam_policy.autoscaler.arn
}

resource "aws_iam_instance_profile" "head" {
  name = "${var.name_prefix}-head"
  role = aws_iam_role.head.name
  tags = var.tags
}

# --- optional IRSA role for the KubeRay service account ---------------------------------------

locals {
  create_irsa = var.eks_oidc_provider_arn != ""
  # arn:aws:iam::<account>:oidc-provider/<issuer host/path>
  oidc_issuer = local.create_irsa ? element(split("oidc-provider/", var.eks_oidc_provider_arn), 1) : ""
}

data "aws_iam_policy_document" "irsa_assume" {
  count = local.create_irsa ? 1 : 0
  statement {
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = ["system:serviceaccount:${var.eks_service_account}"]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "irsa" {
  count              = local.create_irsa ? 1 : 0
  name               = "${var.name_prefix}-irsa"
  description        = "raysys KubeRay pods (${var.eks_service_account}): read/write on s3://${var.bucket_name}"
  assume_role_policy = data.aws_iam_policy_document.irsa_assume[0].json
  tags               = var.tags
}

resource "aws_iam_role_policy_attachment" "irsa_bucket_access" {
  count      = local.create_irsa ? 1 : 0
  role       = aws_iam_role.irsa[0].name
  policy_arn = aws_iam_policy.bucket_access.arn
}
