// SPDX-License-Identifier: GPL-2.0
/*
 * edu_irq: a minimal interrupt driver for QEMU's edu device (1234:11e8),
 * for qbackend's differential guest tests (QEMU's -device edu against an
 * edu served over vfio-user).  It binds every 1234:11e8 function, turns on
 * bus mastering (the device's DMA engine needs it), and takes the device's
 * one interrupt as MSI or as INTx.  Its handler reads the interrupt status
 * register (BAR0 + 0x24), writes that value to the acknowledge register
 * (BAR0 + 0x64) and counts the interrupt.  BAR0 is not requested, so that a
 * guest program can still mmap resource0 while the driver is bound.
 *
 * Module parameter:
 *   mode=msi|intx  how a device is set up when it is bound (default msi);
 *                  /sys/module/edu_irq/parameters/mode, writable, is read
 *                  at each probe.
 *
 * Attributes in the PCI device's sysfs directory:
 *   irq_mode      "msi" or "intx": what the device uses now (read from the
 *                 PCI core's state); write "msi" or "intx" to switch
 *   irq_count     interrupts handled: handler runs that found a nonzero
 *                 interrupt status (and acknowledged it)
 *   irq_spurious  handler runs that found the interrupt status zero (INTx:
 *                 a shared line; left unacknowledged, IRQ_NONE)
 *   last_status   the nonzero interrupt status the handler last acknowledged,
 *                 "0x%08x" ("0x00000000" before the first)
 *   irq_line      the Linux irq number in use (-1 if none)
 */
#include <linux/atomic.h>
#include <linux/dma-mapping.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/slab.h>
#include <linux/string.h>

#define EDU_VENDOR 0x1234
#define EDU_DEVICE 0x11e8
#define EDU_REG_IRQ_STATUS 0x24
#define EDU_REG_IRQ_ACK 0x64
#define EDU_REGS_LEN 0x100
#define EDU_DMA_BITS 28

#ifndef PCI_IRQ_INTX
#define PCI_IRQ_INTX PCI_IRQ_LEGACY
#endif

static char mode[8] = "msi";
module_param_string(mode, mode, sizeof(mode), 0644);
MODULE_PARM_DESC(mode, "interrupt mode for newly bound devices: msi or intx");

struct edu_dev {
	struct pci_dev *pdev;
	void __iomem *regs;
	struct mutex lock; /* irq setup and teardown */
	int irq;	   /* Linux irq, -1 when none is requested */
	bool msi;
	atomic64_t count;
	atomic64_t spurious;
	atomic_t last_status;
	char name[40];
};

static irqreturn_t edu_interrupt(int irq, void *data)
{
	struct edu_dev *edu = data;
	u32 status = ioread32(edu->regs + EDU_REG_IRQ_STATUS);

	if (!status) {
		atomic64_inc(&edu->spurious);
		return edu->msi ? IRQ_HANDLED : IRQ_NONE;
	}
	/* Counted before the acknowledgement: once a guest program sees the
	 * status drop to zero, the count already includes this interrupt. */
	atomic_set(&edu->last_status, status);
	atomic64_inc(&edu->count);
	iowrite32(status, edu->regs + EDU_REG_IRQ_ACK);
	return IRQ_HANDLED;
}

static int parse_mode(const char *buf, bool *msi)
{
	if (sysfs_streq(buf, "msi"))
		*msi = true;
	else if (sysfs_streq(buf, "intx"))
		*msi = false;
	else
		return -EINVAL;
	return 0;
}

/* Called with edu->lock held (or before the device is visible). */
static int edu_setup_irq(struct edu_dev *edu, bool msi)
{
	struct pci_dev *pdev = edu->pdev;
	int n, irq, err;

	n = pci_alloc_irq_vectors(pdev, 1, 1, msi ? PCI_IRQ_MSI : PCI_IRQ_INTX);
	if (n < 0)
		return n;
	irq = pci_irq_vector(pdev, 0);
	if (irq < 0) {
		pci_free_irq_vectors(pdev);
		return irq;
	}
	if (!msi)
		pci_intx(pdev, 1); /* clear Interrupt Disable in the command register */
	edu->msi = msi;
	err = request_irq(irq, edu_interrupt, msi ? 0 : IRQF_SHARED, edu->name, edu);
	if (err) {
		pci_free_irq_vectors(pdev);
		return err;
	}
	edu->irq = irq;
	return 0;
}

static void edu_teardown_irq(struct edu_dev *edu)
{
	if (edu->irq < 0)
		return;
	free_irq(edu->irq, edu);
	pci_free_irq_vectors(edu->pdev);
	edu->irq = -1;
}

static struct edu_dev *to_edu(struct device *dev)
{
	return pci_get_drvdata(to_pci_dev(dev));
}

static ssize_t irq_mode_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct edu_dev *edu = to_edu(dev);

	if (edu->irq < 0)
		return sysfs_emit(buf, "none\n");
	return sysfs_emit(buf, "%s\n", edu->pdev->msi_enabled ? "msi" : "intx");
}

static ssize_t irq_mode_store(struct device *dev, struct device_attribute *attr,
			      const char *buf, size_t len)
{
	struct edu_dev *edu = to_edu(dev);
	bool msi;
	int err;

	err = parse_mode(buf, &msi);
	if (err)
		return err;
	mutex_lock(&edu->lock);
	edu_teardown_irq(edu);
	err = edu_setup_irq(edu, msi);
	mutex_unlock(&edu->lock);
	if (err) {
		dev_err(dev, "edu_irq: cannot set up %s: %d\n", msi ? "MSI" : "INTx", err);
		return err;
	}
	return len;
}
static DEVICE_ATTR_RW(irq_mode);

static ssize_t irq_count_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%lld\n", (long long)atomic64_read(&to_edu(dev)->count));
}
static DEVICE_ATTR_RO(irq_count);

static ssize_t irq_spurious_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%lld\n", (long long)atomic64_read(&to_edu(dev)->spurious));
}
static DEVICE_ATTR_RO(irq_spurious);

static ssize_t last_status_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "0x%08x\n", (u32)atomic_read(&to_edu(dev)->last_status));
}
static DEVICE_ATTR_RO(last_status);

static ssize_t irq_line_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%d\n", to_edu(dev)->irq);
}
static DEVICE_ATTR_RO(irq_line);

static struct attribute *edu_attrs[] = {
	&dev_attr_irq_mode.attr,
	&dev_attr_irq_count.attr,
	&dev_attr_irq_spurious.attr,
	&dev_attr_last_status.attr,
	&dev_attr_irq_line.attr,
	NULL,
};
ATTRIBUTE_GROUPS(edu);

static int edu_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct edu_dev *edu;
	bool msi;
	int err;

	err = parse_mode(mode, &msi);
	if (err) {
		dev_err(&pdev->dev, "edu_irq: mode=%s is neither msi nor intx\n", mode);
		return err;
	}
	edu = kzalloc(sizeof(*edu), GFP_KERNEL);
	if (!edu)
		return -ENOMEM;
	edu->pdev = pdev;
	edu->irq = -1;
	mutex_init(&edu->lock);
	snprintf(edu->name, sizeof(edu->name), "edu_irq:%s", pci_name(pdev));

	err = pci_enable_device(pdev);
	if (err)
		goto free;
	edu->regs = pci_iomap(pdev, 0, EDU_REGS_LEN);
	if (!edu->regs) {
		err = -ENOMEM;
		goto disable;
	}
	err = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(EDU_DMA_BITS));
	if (err)
		dev_warn(&pdev->dev, "edu_irq: no %d-bit DMA mask: %d\n", EDU_DMA_BITS, err);
	pci_set_master(pdev); /* the DMA engine, and MSI writes, are bus master cycles */
	pci_set_drvdata(pdev, edu);
	err = edu_setup_irq(edu, msi);
	if (err) {
		dev_err(&pdev->dev, "edu_irq: cannot set up %s: %d\n", msi ? "MSI" : "INTx", err);
		goto unmap;
	}
	dev_info(&pdev->dev, "edu_irq: %s, irq %d, id %#010x\n", msi ? "MSI" : "INTx", edu->irq,
		 ioread32(edu->regs));
	return 0;

unmap:
	pci_clear_master(pdev);
	pci_iounmap(pdev, edu->regs);
disable:
	pci_disable_device(pdev);
free:
	kfree(edu);
	return err;
}

static void edu_remove(struct pci_dev *pdev)
{
	struct edu_dev *edu = pci_get_drvdata(pdev);

	mutex_lock(&edu->lock);
	edu_teardown_irq(edu);
	mutex_unlock(&edu->lock);
	pci_iounmap(pdev, edu->regs);
	pci_clear_master(pdev);
	pci_disable_device(pdev);
	kfree(edu);
}

static const struct pci_device_id edu_ids[] = {
	{ PCI_DEVICE(EDU_VENDOR, EDU_DEVICE) },
	{ }
};
MODULE_DEVICE_TABLE(pci, edu_ids);

static struct pci_driver edu_driver = {
	.name = "edu_irq",
	.id_table = edu_ids,
	.probe = edu_probe,
	.remove = edu_remove,
	.dev_groups = edu_groups,
};
module_pci_driver(edu_driver);

MODULE_DESCRIPTION("edu (1234:11e8) interrupt counter for qbackend tests");
MODULE_LICENSE("GPL");
