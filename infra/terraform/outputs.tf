output "bucket_name" {
  description = "The bucket: use s3://<bucket_name>/runs/... for --out and s3://<bucket_name>/<cache_prefix> for extract.cache_dir."
  value       = aws_s3_bucket.this.bucket
}

output "bucket_arn" {
  description = "ARN of the bucket."
  value       = aws_s3_bucket.this.arn
}

output "instance_profile_name" {
  description = "EC2 instance profile for `ray up` worker nodes (node_config.IamInstanceProfile.Name)."
  value       = aws_iam_instance_profile.node.name
}

output "instance_profile_arn" {
  description = "EC2 instance profile for `ray up` worker nodes (node_config.IamInstanceProfile.Arn)."
  value       = aws_iam_instance_profile.node.arn
}

output "head_instance_profile_name" {
  description = "EC2 instance profile for the `ray up` head node: the bucket plus Ray's autoscaler (launch/terminate this cluster's workers)."
  value       = aws_iam_instance_profile.head.name
}

output "head_instance_profile_arn" {
  description = "ARN of the head node's instance profile."
  value       = aws_iam_instance_profile.head.arn
}

output "node_role_arn" {
  description = "IAM role behind the instance profile."
  value       = aws_iam_role.node.arn
}

output "bucket_access_policy_arn" {
  description = "Managed policy with read/write on this bucket only; attach it to other roles that need the bucket."
  value       = aws_iam_policy.bucket_access.arn
}

output "irsa_role_arn" {
  description = "IAM role for the KubeRay service account (annotate it in infra/k8s/serviceaccount.yaml); null unless eks_oidc_provider_arn is set."
  value       = local.create_irsa ? aws_iam_role.irsa[0].arn : null
}
