// SPDX-License-Identifier: GPL-2.0
/*
 * ivshmem_msix: a minimal driver for ivshmem devices (1af4:1110) with
 * MSI-X, for qbackend's guest tests.  It enables every MSI-X vector, counts
 * interrupts per vector (they also show in /proc/interrupts as
 * "ivshmem_msix:BDF:vN"), and lets the shell ring doorbells and mask
 * vectors.  Devices without MSI-X are left to other drivers (uio).
 *
 * Attributes in the PCI device's sysfs directory:
 *   counts       interrupts received per vector, space separated
 *   irqs         the Linux irq number of each vector
 *   ivposition   BAR0 IVPosition
 *   doorbell     write "PEER VECTOR [COUNT]": COUNT doorbell writes (default 1)
 *   burst_ns     duration of the last doorbell write to this attribute
 *   mask         write "VECTOR 1" to mask the vector, "VECTOR 0" to unmask
 *                (disable_irq / enable_irq, unlazy: the MSI-X entry's mask
 *                bit is set at once)
 *   fmask        write 1 / 0: set / clear the MSI-X Function Mask bit (config
 *                space, which QEMU forwards to a vfio-user server)
 *   pba          the first 64 pending bits, read from the PBA (hex)
 */
#include <linux/atomic.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/irq.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/slab.h>

#define IVSHMEM_VENDOR 0x1af4
#define IVSHMEM_DEVICE 0x1110
#define REG_IVPOSITION 8
#define REG_DOORBELL 12
#define MAX_BURST 10000000

struct ivx_vector {
	struct ivx_dev *ivx;
	unsigned int nr;
	unsigned int irq;
	atomic64_t count;
	bool masked;
	char name[48];
};

struct ivx_dev {
	struct pci_dev *pdev;
	void __iomem *regs;
	void __iomem *pba;
	int nvec;
	u64 burst_ns;
	struct mutex lock;
	struct ivx_vector vec[];
};

static irqreturn_t ivx_interrupt(int irq, void *data)
{
	struct ivx_vector *v = data;

	atomic64_inc(&v->count);
	return IRQ_HANDLED;
}

static struct ivx_dev *to_ivx(struct device *dev)
{
	return pci_get_drvdata(to_pci_dev(dev));
}

static ssize_t counts_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct ivx_dev *ivx = to_ivx(dev);
	int i, n = 0;

	for (i = 0; i < ivx->nvec; i++)
		n += sysfs_emit_at(buf, n, "%s%lld", i ? " " : "",
				   (long long)atomic64_read(&ivx->vec[i].count));
	n += sysfs_emit_at(buf, n, "\n");
	return n;
}
static DEVICE_ATTR_RO(counts);

static ssize_t irqs_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct ivx_dev *ivx = to_ivx(dev);
	int i, n = 0;

	for (i = 0; i < ivx->nvec; i++)
		n += sysfs_emit_at(buf, n, "%s%u", i ? " " : "", ivx->vec[i].irq);
	n += sysfs_emit_at(buf, n, "\n");
	return n;
}
static DEVICE_ATTR_RO(irqs);

static ssize_t ivposition_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%u\n", ioread32(to_ivx(dev)->regs + REG_IVPOSITION));
}
static DEVICE_ATTR_RO(ivposition);

static ssize_t doorbell_store(struct device *dev, struct device_attribute *attr,
			      const char *buf, size_t len)
{
	struct ivx_dev *ivx = to_ivx(dev);
	unsigned int peer, vector, count = 1, i;
	ktime_t start;
	int n;

	n = sscanf(buf, "%u %u %u", &peer, &vector, &count);
	if (n < 2 || peer > 0xffff || vector > 0xffff || count < 1 || count > MAX_BURST)
		return -EINVAL;
	mutex_lock(&ivx->lock);
	start = ktime_get();
	for (i = 0; i < count; i++) {
		iowrite32(peer << 16 | vector, ivx->regs + REG_DOORBELL);
		if ((i & 1023) == 1023)
			cond_resched();
	}
	ivx->burst_ns = ktime_to_ns(ktime_sub(ktime_get(), start));
	mutex_unlock(&ivx->lock);
	return len;
}
static DEVICE_ATTR_WO(doorbell);

static ssize_t burst_ns_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%llu\n", (unsigned long long)to_ivx(dev)->burst_ns);
}
static DEVICE_ATTR_RO(burst_ns);

static ssize_t mask_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct ivx_dev *ivx = to_ivx(dev);
	int i, n = 0;

	for (i = 0; i < ivx->nvec; i++)
		n += sysfs_emit_at(buf, n, "%s%d", i ? " " : "", ivx->vec[i].masked);
	n += sysfs_emit_at(buf, n, "\n");
	return n;
}

static ssize_t mask_store(struct device *dev, struct device_attribute *attr,
			  const char *buf, size_t len)
{
	struct ivx_dev *ivx = to_ivx(dev);
	unsigned int vector, masked;
	struct ivx_vector *v;

	if (sscanf(buf, "%u %u", &vector, &masked) != 2 || vector >= ivx->nvec || masked > 1)
		return -EINVAL;
	v = &ivx->vec[vector];
	mutex_lock(&ivx->lock);
	if (masked && !v->masked)
		disable_irq(v->irq);
	else if (!masked && v->masked)
		enable_irq(v->irq);
	v->masked = masked;
	mutex_unlock(&ivx->lock);
	return len;
}
static DEVICE_ATTR_RW(mask);

static ssize_t fmask_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct pci_dev *pdev = to_pci_dev(dev);
	u16 ctrl;

	pci_read_config_word(pdev, pdev->msix_cap + PCI_MSIX_FLAGS, &ctrl);
	return sysfs_emit(buf, "%d\n", !!(ctrl & PCI_MSIX_FLAGS_MASKALL));
}

static ssize_t fmask_store(struct device *dev, struct device_attribute *attr,
			   const char *buf, size_t len)
{
	struct pci_dev *pdev = to_pci_dev(dev);
	struct ivx_dev *ivx = to_ivx(dev);
	unsigned int masked;
	u16 ctrl;

	if (kstrtouint(buf, 0, &masked) || masked > 1)
		return -EINVAL;
	mutex_lock(&ivx->lock);
	pci_read_config_word(pdev, pdev->msix_cap + PCI_MSIX_FLAGS, &ctrl);
	if (masked)
		ctrl |= PCI_MSIX_FLAGS_MASKALL;
	else
		ctrl &= ~PCI_MSIX_FLAGS_MASKALL;
	pci_write_config_word(pdev, pdev->msix_cap + PCI_MSIX_FLAGS, ctrl);
	mutex_unlock(&ivx->lock);
	return len;
}
static DEVICE_ATTR_RW(fmask);

static ssize_t pba_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct ivx_dev *ivx = to_ivx(dev);
	u64 lo = ioread32(ivx->pba), hi = ioread32(ivx->pba + 4);

	return sysfs_emit(buf, "%#llx\n", (unsigned long long)(hi << 32 | lo));
}
static DEVICE_ATTR_RO(pba);

static struct attribute *ivx_attrs[] = {
	&dev_attr_counts.attr,
	&dev_attr_irqs.attr,
	&dev_attr_ivposition.attr,
	&dev_attr_doorbell.attr,
	&dev_attr_burst_ns.attr,
	&dev_attr_mask.attr,
	&dev_attr_fmask.attr,
	&dev_attr_pba.attr,
	NULL,
};
ATTRIBUTE_GROUPS(ivx);

static void ivx_release_irqs(struct ivx_dev *ivx, int upto)
{
	int i;

	for (i = 0; i < upto; i++) {
		if (ivx->vec[i].masked)
			enable_irq(ivx->vec[i].irq);
		free_irq(ivx->vec[i].irq, &ivx->vec[i]);
	}
}

static int ivx_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct ivx_dev *ivx;
	int nvec, i, err, cap;
	u32 pba_info;

	nvec = pci_msix_vec_count(pdev);
	if (nvec < 1)
		return -ENODEV; /* no MSI-X: not ours */
	cap = pdev->msix_cap;

	ivx = kzalloc(struct_size(ivx, vec, nvec), GFP_KERNEL);
	if (!ivx)
		return -ENOMEM;
	ivx->pdev = pdev;
	ivx->nvec = nvec;
	mutex_init(&ivx->lock);

	err = pci_enable_device(pdev);
	if (err)
		goto free;
	/* BARs are not requested, so that /dev/mem can still reach BAR2. */
	ivx->regs = pci_iomap(pdev, 0, 256);
	if (!ivx->regs) {
		err = -ENOMEM;
		goto disable;
	}
	pci_read_config_dword(pdev, cap + PCI_MSIX_PBA, &pba_info);
	ivx->pba = ioremap(pci_resource_start(pdev, pba_info & PCI_MSIX_PBA_BIR) +
			   (pba_info & PCI_MSIX_PBA_OFFSET), 8);
	if (!ivx->pba) {
		err = -ENOMEM;
		goto unmap;
	}
	pci_set_master(pdev); /* MSI writes are DMA */
	err = pci_alloc_irq_vectors(pdev, nvec, nvec, PCI_IRQ_MSIX);
	if (err < 0)
		goto unmap_pba;
	for (i = 0; i < nvec; i++) {
		struct ivx_vector *v = &ivx->vec[i];

		v->ivx = ivx;
		v->nr = i;
		v->irq = pci_irq_vector(pdev, i);
		snprintf(v->name, sizeof(v->name), "ivshmem_msix:%s:v%d", pci_name(pdev), i);
		/* disable_irq masks the MSI-X entry at once, not lazily */
		irq_set_status_flags(v->irq, IRQ_DISABLE_UNLAZY);
		err = request_irq(v->irq, ivx_interrupt, 0, v->name, v);
		if (err) {
			ivx_release_irqs(ivx, i);
			goto free_vectors;
		}
	}
	pci_set_drvdata(pdev, ivx);
	dev_info(&pdev->dev, "ivshmem_msix: %d MSI-X vectors, IVPosition %u\n", nvec,
		 ioread32(ivx->regs + REG_IVPOSITION));
	return 0;

free_vectors:
	pci_free_irq_vectors(pdev);
unmap_pba:
	iounmap(ivx->pba);
unmap:
	pci_iounmap(pdev, ivx->regs);
disable:
	pci_disable_device(pdev);
free:
	kfree(ivx);
	return err;
}

static void ivx_remove(struct pci_dev *pdev)
{
	struct ivx_dev *ivx = pci_get_drvdata(pdev);

	ivx_release_irqs(ivx, ivx->nvec);
	pci_free_irq_vectors(pdev);
	iounmap(ivx->pba);
	pci_iounmap(pdev, ivx->regs);
	pci_clear_master(pdev);
	pci_disable_device(pdev);
	kfree(ivx);
}

static const struct pci_device_id ivx_ids[] = {
	{ PCI_DEVICE(IVSHMEM_VENDOR, IVSHMEM_DEVICE) },
	{ }
};
MODULE_DEVICE_TABLE(pci, ivx_ids);

static struct pci_driver ivx_driver = {
	.name = "ivshmem_msix",
	.id_table = ivx_ids,
	.probe = ivx_probe,
	.remove = ivx_remove,
	.dev_groups = ivx_groups,
};
module_pci_driver(ivx_driver);

MODULE_DESCRIPTION("ivshmem MSI-X interrupt counter for qbackend tests");
MODULE_LICENSE("GPL");
